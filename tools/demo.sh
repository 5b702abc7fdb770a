#!/usr/bin/env bash
# `make demo`: the whole product on the embedded default, on CPU.
#   generated lidar scenes -> the demo teacher -> featcache build (teacher run once) ->
#   featcache train: two students distilled from the one cache (the --kd recipe below), one student
#   without distillation, and a short online-teacher run for the step-time comparison (two at a time) ->
#   evaluation of every model -> each exported for ONNX Runtime and timed (tools/deploy_report.py) ->
#   work_dirs/demo/report.md with PNG plots and the deployment table.
# --quick runs the same chain at tiny size (a few scenes, a few iterations) for the tests.
# RETRAIN_TEACHER=1 retrains the shipped teacher first (tools/train_demo_teacher.sh, ~35 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FC=.venv/bin/featcache
TEACHER_CONFIG=configs/demo/teacher_pillar.py
TEACHER_CKPT=${TEACHER_CKPT:-checkpoints/demo_teacher_pillar.pth}
# distillation recipe (featcache train --kd); KD_LOSS=NAME, the older switch, means KD=NAME=1. The
# default is QUALITY.md's best: response KD on the cached heatmaps and regression outputs, the KD
# students starting from the teacher's sliced weights (INIT_FROM_TEACHER=0: from random weights).
KD=${KD:-${KD_LOSS:+$KD_LOSS=1}}
KD=${KD:-heatmap=10,reg=1}
INIT=()
if [[ "${INIT_FROM_TEACHER:-1}" == 1 ]]; then INIT=(--init-from-teacher "$TEACHER_CONFIG" "$TEACHER_CKPT"); fi

if [[ "${1:-}" == "--quick" ]]; then
    MODE=quick; WORK=${DEMO_WORK_DIR:-work_dirs/demo_quick}; DATA=$WORK/data
    SCENES=(--train 6 --val 3); ONLINE_SAMPLES=4; DEPLOY_SCANS=3
    # one-epoch students score near the 0.1 threshold everywhere: cap the boxes NMS sees per task
    EVAL_OPTS=(--cfg-options model.test_cfg.pts.pre_max_size=100 --cfg-options model.test_cfg.pts.post_max_size=50)
    # one epoch: the students' schedule (configs/_base_/demo_scenes.py) shortened to match
    SCHEDULE=(--cfg-options train_cfg.max_epochs=1 --cfg-options param_scheduler.1.T_max=1
              --cfg-options param_scheduler.1.end=1 --cfg-options default_hooks.logger.interval=1)
else
    MODE=full; WORK=${DEMO_WORK_DIR:-work_dirs/demo}; DATA=data/generated/demo
    SCENES=(--train 400 --val 100); ONLINE_SAMPLES=60; DEPLOY_SCANS=${DEPLOY_SCANS:-30}; SCHEDULE=(); EVAL_OPTS=()
fi
mkdir -p "$WORK"
TIMINGS=$WORK/timings.tsv
: > "$TIMINGS"
start_ns=$(date +%s%N)

stage() {  # stage NAME command...: run it and record its wall time (ms) for the report
    local name=$1; shift
    local t0; t0=$(date +%s%N)
    echo "=== [$MODE] $name"
    "$@"
    printf '%s\t%d\n' "$name" $(( ($(date +%s%N) - t0) / 1000000 )) >> "$TIMINGS"
}

DATA_OPTS=(--cfg-options "train_dataloader.dataset.data_root=$DATA/"
           --cfg-options "test_dataloader.dataset.data_root=$DATA/")
STUDENT_OPTS=("${DATA_OPTS[@]}" "${SCHEDULE[@]}")
# the teacher's pts_neck map, head outputs and boxes: what every --kd recipe of QUALITY.md reads (a cache
# of older demos held less, stored heatmaps as fp16 or score8, or regression outputs at every cell; a build never
# rewrites another cache's outputs)
CACHE=$WORK/cache_neck_heads_boxes_asin8_centres

stage generate $PY tools/generate_scenes.py --out "$DATA" "${SCENES[@]}" --seed 0 --range 40 >/dev/null
if [[ "${RETRAIN_TEACHER:-0}" == 1 || ! -f "$TEACHER_CKPT" ]]; then
    stage teacher bash tools/train_demo_teacher.sh "$TEACHER_CKPT"
fi
stage build $FC build "$TEACHER_CONFIG" "$TEACHER_CKPT" --out "$CACHE" --layers pts_neck --head-outputs all \
    --boxes "${DATA_OPTS[@]}"
stage verify $FC verify "$CACHE"
# The four trainings run two at a time, one torch thread each (as QUALITY.md's runs are trained): on 2 cores
# a pair takes about as long as its longer run alone at two threads, so the pairs cost ~40% less than the
# four one after the other. Each run's console output goes to its work dir's console.log.
train_half_kd() {
    stage train_half_kd $FC train configs/demo/student_half.py --cache "$CACHE" --kd "$KD" "${INIT[@]}" \
        --work-dir "$WORK/student_half_kd" "${STUDENT_OPTS[@]}"
}
train_half_nokd() {
    stage train_half_nokd $FC train configs/demo/student_half.py --no-distill \
        --work-dir "$WORK/student_half_nokd" "${STUDENT_OPTS[@]}"
}
train_slim_kd() {
    stage train_slim_kd $FC train configs/demo/student_slim.py --cache "$CACHE" --kd "$KD" "${INIT[@]}" \
        --work-dir "$WORK/student_slim_kd" "${STUDENT_OPTS[@]}"
}
# Step time with the teacher in the process: same student, loss and batch, on the first samples only.
train_half_online() {
    stage train_half_online $FC train configs/demo/student_half.py --online-teacher "$TEACHER_CONFIG" \
        "$TEACHER_CKPT" --kd "$KD" "${INIT[@]}" --work-dir "$WORK/student_half_online" "${DATA_OPTS[@]}" \
        --teacher-cfg-options "train_dataloader.dataset.data_root=$DATA/" \
        --cfg-options "train_dataloader.dataset.indices=$ONLINE_SAMPLES" --cfg-options train_cfg.max_epochs=1
}
side_by_side() {  # side_by_side FUNCTION...: run the stages at once, one torch thread each; fail if any fails
    local pids=() names=() failed=0 i
    for name in "$@"; do
        mkdir -p "$WORK/student_${name#train_}"
        ( export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1; "$name" > "$WORK/student_${name#train_}/console.log" 2>&1 ) &
        pids+=($!); names+=("$name")
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            failed=1
            echo "${names[$i]} failed; the end of $WORK/student_${names[$i]#train_}/console.log:" >&2
            tail -n 40 "$WORK/student_${names[$i]#train_}/console.log" >&2
        fi
    done
    return "$failed"
}
echo "=== [$MODE] train_half_kd + train_half_nokd, side by side"
side_by_side train_half_kd train_half_nokd
echo "=== [$MODE] train_slim_kd + train_half_online, side by side"
side_by_side train_slim_kd train_half_online
# Deployment: each model exported for ONNX Runtime (fp32 and int8) and timed at batch 1 beside PyTorch, on the
# first DEPLOY_SCANS val scans (latency, memory, and each form's mAP on those scans).
# The students' recipe as QUALITY.md names it, for their retention as it measures it.
QUALITY_RECIPE=$KD; if [[ ${#INIT[@]} -gt 0 ]]; then QUALITY_RECIPE+=",init"; fi
stage deploy $PY tools/deploy_report.py --out "$WORK/deployment.md" --work-dir "$WORK/deploy" --int8 \
    --quick "$DEPLOY_SCANS" "${DATA_OPTS[@]}" "${EVAL_OPTS[@]}" --quality-recipe "$QUALITY_RECIPE" \
    --model teacher "$TEACHER_CONFIG" "$TEACHER_CKPT" \
    --model half_kd configs/demo/student_half.py "$WORK/student_half_kd/student.pth" \
    --model slim_kd configs/demo/student_slim.py "$WORK/student_slim_kd/student.pth"
stage report $PY tools/demo_report.py --out "$WORK/report.md" --cache "$CACHE" --timings "$TIMINGS" \
    --cfg-options "train_dataloader.dataset.data_root=$DATA/" --cfg-options "test_dataloader.dataset.data_root=$DATA/" \
    "${EVAL_OPTS[@]}" \
    --teacher "$TEACHER_CONFIG" "$TEACHER_CKPT" \
    --student half_kd configs/demo/student_half.py "$WORK/student_half_kd" \
    --student slim_kd configs/demo/student_slim.py "$WORK/student_slim_kd" \
    --student half_nokd configs/demo/student_half.py "$WORK/student_half_nokd" \
    --online half_kd "$WORK/student_half_online" --baseline half_kd half_nokd --deployment "$WORK/deployment.md"

total=$(( ($(date +%s%N) - start_ns) / 1000000000 ))
printf '\nWall time of this `tools/demo.sh%s` run (set-up excluded), measured by the script: **%d s** (%d min %02d s).\n' \
    "$([[ $MODE == quick ]] && echo ' --quick')" "$total" $(( total / 60 )) $(( total % 60 )) >> "$WORK/report.md"
echo "demo ($MODE) finished in $total s; report: $WORK/report.md"
