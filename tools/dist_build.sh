#!/usr/bin/env bash
# mmdet3d-style launcher: tools/dist_build.sh TEACHER_CONFIG CHECKPOINT GPUS [featcache build options]
set -euo pipefail
CONFIG=$1; CHECKPOINT=$2; GPUS=$3; shift 3
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; PORT=${PORT:-29500}; MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
exec python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" -m featcache.cli build "$CONFIG" "$CHECKPOINT" "$@"
