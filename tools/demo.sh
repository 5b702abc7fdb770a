#!/usr/bin/env bash
# `make demo`: the main job on the embedded default.
# Interim (until the demo issue lands): generated lidar scenes -> a BEVFusion-lidar-shaped
# CenterPoint-voxel0075 teacher (seeded initial weights: no trained teacher yet) -> featcache
# build -> verify -> inspect with a BEV plot.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FC=.venv/bin/featcache
WORK=work_dirs/demo
DATA=data/generated/demo
CONFIG=centerpoint/centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py
mkdir -p "$WORK"
start=$(date +%s)

$FC --help
$PY tools/generate_scenes.py --out "$DATA" --train 4 --val 1 --seed 0
[[ -f "$WORK/teacher_init.pth" ]] || $PY tools/init_checkpoint.py "$CONFIG" "$WORK/teacher_init.pth"
opts=(--cfg-options "train_dataloader.dataset.dataset.data_root=$DATA/"
      --cfg-options "train_dataloader.dataset.dataset.ann_file=nuscenes_infos_train.pkl")
$FC build "$CONFIG" "$WORK/teacher_init.pth" --out "$WORK/cache" "${opts[@]}" --num-workers 1
$FC verify "$WORK/cache"
$FC inspect "$WORK/cache" --plot "$WORK/teacher_bev.png"
echo "demo finished in $(( $(date +%s) - start ))s; outputs in $WORK"
