#!/usr/bin/env bash
# mmdet3d-style launcher: tools/dist_train.sh STUDENT_CONFIG GPUS --cache CACHE [featcache train options]
set -euo pipefail
CONFIG=$1; GPUS=$2; shift 2
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; PORT=${PORT:-29500}; MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
exec python -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" -m trainer.cli train "$CONFIG" "$@"
