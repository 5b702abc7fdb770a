#!/usr/bin/env bash
# Reproduce checkpoints/demo_teacher_pillar.pth, the teacher `make demo` ships with: generate the demo
# scenes (seed 0), train configs/demo/teacher_pillar.py on them without distillation (20 epochs,
# tens of minutes on 2 CPU cores), keep the final weights only, stored as float16.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DEMO_DATA:-data/generated/demo}
WORK=${TEACHER_WORK_DIR:-work_dirs/demo_teacher}
OUT=${1:-checkpoints/demo_teacher_pillar.pth}
$PY tools/generate_scenes.py --out "$DATA" --train 400 --val 100 --seed 0 --range 40 >/dev/null
.venv/bin/featcache train configs/demo/teacher_pillar.py --no-distill --work-dir "$WORK" \
    --cfg-options "train_dataloader.dataset.data_root=$DATA/"
$PY tools/slim_checkpoint.py "$WORK/student.pth" "$OUT" --fp16
