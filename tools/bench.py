"""Benchmarks of featcache on BEVFusion-lidar shapes, measured side by side in one run.

The teacher is mmdet3d's CenterPoint-voxel0075 (the encoder, backbone and neck of
BEVFusion-lidar: pts_middle_encoder 256x180x180, pts_backbone 128x180x180 + 256x90x90, pts_neck
512x180x180) with a seeded checkpoint (featcache.testing.teacher_checkpoint), run on the real
nuScenes scan of ../shared/data and rigidly transformed copies of it (make_nuscenes_like). Every
figure of BENCHMARKS.md comes from this script's own measurements; the file is rewritten at the end.

Usage: python tools/bench.py [--quick] [--out BENCHMARKS.md] [--epochs 20]

``--quick`` runs every figure at tiny sizes (a smoke test, under 3 minutes) and, unless ``--out``
is given, prints the report instead of writing BENCHMARKS.md. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

import torch  # noqa: E402

from featcache.benchmarks.common import (BUILD_WORKERS, FULL, LAYERS, QUICK, START, Context,  # noqa: E402
                                         Section, Sizes, Target, cold_method, log, table, verdict)
from featcache.benchmarks.machine import cpu_model, drop_page_cache, memory_total_gib  # noqa: E402
from featcache.benchmarks.read_figures import (figure_hdf5, figure_read, figure_scale,  # noqa: E402
                                               measure_codec_reads)
from featcache.benchmarks.storage_figures import (figure_build, figure_cost, figure_storage,  # noqa: E402
                                                  make_scale_caches)
from featcache.inspection import stored_bytes_per_sample  # noqa: E402
from featcache.reader import FeatureCache  # noqa: E402

STUDENT_CONFIG = REPO / "configs" / "students" / "centerpoint_pillar_half_nus.py"


# -- set-up -----------------------------------------------------------------------------------

def prepare(sizes: Sizes, epochs: int, work: Path) -> Context:
    """Frames (real scan + transformed copies), a seeded voxel0075 checkpoint, the cold-read check."""
    from featcache.testing import VOXEL_CONFIG, make_nuscenes_like, nus_cfg_options, teacher_checkpoint

    load_at_start = os.getloadavg()[0]
    log(f"preparing {sizes.frames} frames and a seeded {VOXEL_CONFIG.split('/')[-1]} checkpoint in {work}")
    data_root = make_nuscenes_like(work / "data", sizes.frames)
    checkpoint = teacher_checkpoint(work, VOXEL_CONFIG, seed=5)
    cold_failure = drop_page_cache()
    log("cold reads: " + ("page cache can be dropped" if cold_failure is None else f"unavailable ({cold_failure})"))
    return Context(sizes=sizes, epochs=epochs, work=work, data_root=data_root, checkpoint=checkpoint,
                   cfg_options=nus_cfg_options(data_root, splits=("train",)), cold_failure=cold_failure,
                   load_at_start=load_at_start)


# -- figures that train (the cache-side ones are featcache.benchmarks') --------------------------

class TrainingRun:
    """One variant's model, optimiser and endless batches, stepped on demand."""

    def __init__(self, cfg: Any) -> None:
        from mmdet3d.registry import MODELS
        from mmengine.optim import build_optim_wrapper
        from mmengine.runner import Runner

        torch.manual_seed(0)
        self.model = MODELS.build(cfg.model).train()
        self.optim_wrapper = build_optim_wrapper(self.model, cfg.optim_wrapper)
        # mmengine's iteration-based sampler: no epoch boundary (where a DataLoader refills its
        # prefetch queue from scratch) every few steps of a 6-frame dataset; a real epoch is thousands
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg.sampler = dict(type="InfiniteSampler", shuffle=True)
        self.batches = iter(Runner.build_dataloader(loader_cfg, seed=0))
        self.times: list[float] = []
        self.teacher_times: list[float] = []  # online KD: seconds of each step spent getting the teacher's maps
        if getattr(self.model, "teacher", None) is not None:
            raw_targets = self.model._raw_targets

            def timed_raw_targets(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = raw_targets(*args, **kwargs)
                self.teacher_times.append(time.perf_counter() - start)
                return result

            self.model._raw_targets = timed_raw_targets

    def step(self) -> None:
        """One timed iteration: next batch + ``train_step`` (preprocess, loss, backward, update)."""
        start = time.perf_counter()
        self.model.train_step(next(self.batches), self.optim_wrapper)
        self.times.append(time.perf_counter() - start)


def train_step_times(cfgs: dict[str, Any], warmup: int, steps: dict[str, int]) -> dict[str, list[float]]:
    """Seconds per training iteration of each variant, after ``warmup`` untimed ones each, plus for
    online-KD variants ("<label> / teacher") the seconds of each step spent in the teacher.

    The variants take turns step by step (round robin) instead of running one after the other, so
    slow drifts of the machine (other jobs, clocks) reach every variant alike and cancel in ratios.
    """
    runs = {label: TrainingRun(cfg) for label, cfg in cfgs.items()}
    for round_index in range(warmup + max(steps.values())):
        for label, run in runs.items():
            if round_index < warmup + steps[label]:
                run.step()
    times = {label: run.times[warmup:] for label, run in runs.items()}
    times.update({f"{label} / teacher": run.teacher_times[warmup:] for label, run in runs.items() if run.teacher_times})
    return times


DEMO_TEACHER = (REPO / "configs" / "demo" / "teacher_pillar.py", REPO / "checkpoints" / "demo_teacher_pillar.pth")


RESPONSE_FRAMES = 2  # frames of figure 8 (a response build of the voxel0075 teacher costs several s/frame)


def figure_response(ctx: Context) -> Section:
    """Figure 8: what response and label targets (``--head-outputs``, ``--boxes``) add to a cache: bytes per
    sample next to the features', and build time next to a features-only build of the same frames."""
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.testing import VOXEL_CONFIG

    frames = min(RESPONSE_FRAMES, ctx.sizes.frames)
    demo_options = {"train_dataloader.dataset.data_root": f"{ctx.data_root}/",  # the demo's train set is not wrapped
                    "train_dataloader.dataset.ann_file": "infos.pkl", "train_dataloader.dataset.indices": frames}
    teachers = {"voxel0075 (BEVFusion-lidar sizes, seeded weights)": (
                    VOXEL_CONFIG, str(ctx.checkpoint),
                    {**ctx.cfg_options, "train_dataloader.dataset.dataset.indices": frames}),
                "demo teacher (trained pillar, configs/demo)": (*map(str, DEMO_TEACHER), demo_options)}
    variants = {"features only": {}, "+ heatmap, boxes": {"head_outputs": "heatmap", "boxes": True},
                "+ all head outputs, boxes": {"head_outputs": "all", "boxes": True},
                # what keeping the regression outputs at box centres saves (the default; the same reg targets)
                "+ all head outputs at every cell (--dense-head-outputs), boxes": {
                    "head_outputs": "all", "boxes": True, "dense_head_outputs": True}}
    rows, targets = [], []
    for label, (config, checkpoint, cfg_options) in teachers.items():
        plain_s = None
        for variant, extra in variants.items():
            log(f"response targets: {label}, {variant}")
            out = ctx.work / f"response-{len(rows)}"
            result = build_cache(BuildOptions(config, checkpoint, str(out), layers=LAYERS, cfg_options=cfg_options,
                                              num_workers=BUILD_WORKERS, device="cpu", progress=False, **extra))
            seconds = result.seconds / result.written
            if plain_s is None:
                plain_s = seconds
                rows.append([label, variant, "", "", "", "", f"{seconds:.2f}", ""])
                continue
            cache = FeatureCache(str(out))
            n = len(cache)

            def stored_bytes(arrays: list) -> float:
                return stored_bytes_per_sample(cache, arrays, range(n)) or 0.0

            head_layers = [layer for layer in cache.manifest.layers if layer.is_head_output]
            feature_bytes = stored_bytes([array for layer in cache.manifest.layers if not layer.is_head_output
                                          for array in layer.arrays()])
            head_bytes = stored_bytes([array for layer in head_layers for array in layer.arrays()])
            box_bytes = stored_bytes([cache.manifest.boxes_array])
            boxes_per_sample = statistics.mean(len(cache.read_boxes(row)) for row in range(n))
            share = (head_bytes + box_bytes) / feature_bytes
            rows.append([label, f"{variant} ({len(head_layers)} layers)", f"{feature_bytes / 1e6:.2f}",
                         f"{head_bytes / 1e6:.3f}", f"{box_bytes / 1e3:.1f} ({boxes_per_sample:.0f} boxes)",
                         f"{share:.2%}", f"{seconds:.2f}", f"{seconds / plain_s:.2f}"])
            if config == VOXEL_CONFIG and not extra.get("dense_head_outputs"):  # the target is on the defaults
                targets.append(Target(f"(head outputs + boxes) / feature bytes, BEVFusion-lidar row, {variant}",
                                      "<= 5%", f"{share:.2%}", share <= 0.05))
    lines = [f"{frames} frames, built per teacher in this process one after the other: the feature layers "
             f"({', '.join(LAYERS)}, default codec) alone, then with `--boxes` and `--head-outputs heatmap` or "
             "`all` (CenterHead outputs of every task at their defaults: heatmaps asin8-zstd3, uint8 sigmoid "
             "scores on their arcsine-root grid, within 0.0031, the regression outputs fp16-zstd1 at the cells of box "
             "centres, annotated and the teacher's, where the reg term reads them, 0 elsewhere; once more with "
             "`--dense-head-outputs`, every cell kept; boxes = the decoded predictions after the teacher's own decoder "
             "and NMS). Bytes per sample from "
             "`featcache.store.chunk_nbytes`; boxes: the `boxes` row (capacity x (box fields + score + label), "
             "float32, zstd3; padding compresses away). Time = `BuildResult.seconds` per sample; a response build "
             "also runs the head, its decoder and NMS, which the features-only forward skips. The voxel0075 "
             "weights are seeded, not trained: its maps are noise, which compresses worse than a trained head's "
             "mostly-background heatmaps, and its boxes are as many as its decoder lets through.", ""]
    lines += table(["teacher", "cached", "features MB/sample", "head outputs MB/sample", "boxes KB/sample",
                    "(head + boxes) / features", "build s/sample", "/ features-only"], rows)
    return Section("8. Response and label targets", lines, targets)


def figure_train(ctx: Context) -> Section:
    """Figure 7: cached-KD vs no-KD vs online-KD training step time, same pillar student and batches."""
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.testing import VOXEL_CONFIG
    from trainer.train import TrainOptions, build_runner_config

    student = str(STUDENT_CONFIG)
    options = {"train_dataloader.dataset.data_root": f"{ctx.data_root}/",
               "train_dataloader.dataset.ann_file": "infos.pkl"}
    if ctx.sizes.train_batch:
        options["train_dataloader.batch_size"] = ctx.sizes.train_batch
    # figure 3's layers plus every head output and the teacher's boxes (the response and label terms' targets),
    # built the same way
    cache, teacher = str(ctx.work / "train-response"), (VOXEL_CONFIG, str(ctx.checkpoint))
    log("train: building the cache of figure 3's layers + head outputs + boxes")
    build_cache(BuildOptions(VOXEL_CONFIG, str(ctx.checkpoint), cache, layers=LAYERS, head_outputs="all", boxes=True,
                             cfg_options=ctx.cfg_options, num_workers=BUILD_WORKERS, device="cpu", progress=False))
    steps, online_steps = ctx.sizes.train_steps, ctx.sizes.online_steps
    no_kd_label, online_label, cached_label = "no KD (--no-distill)", "online KD (voxel0075 teacher), infonce", \
        "cached KD, infonce"
    # every term alone, and a combination, each from the cache
    cached = {"crd": {"crd": 1.0}, "infonce": {"infonce": 1.0}, "mse": {"mse": 1.0}, "pkd": {"pkd": 5.0},
              "heatmap": {"heatmap": 10.0}, "infonce+pkd": {"infonce": 1.0, "pkd": 5.0},
              "heatmap+infonce": {"heatmap": 10.0, "infonce": 1.0}, "heatmap+reg": {"heatmap": 10.0, "reg": 1.0},
              "heatmap+reg+label": {"heatmap": 10.0, "reg": 1.0, "label": 1.0},
              "heatmap(focal)+reg": {"heatmap": {"weight": 1.0, "loss": "focal"}, "reg": 1.0}}
    variants = {no_kd_label: (TrainOptions(student, None, no_distill=True, cfg_options=options), steps),
                **{f"cached KD, {name}": (TrainOptions(student, cache, kd=kd, cfg_options=options), steps)
                   for name, kd in cached.items()},
                online_label: (TrainOptions(student, None, kd={"infonce": 1.0}, cfg_options=options,
                                            online_teacher=teacher), online_steps)}
    cfgs = {label: build_runner_config(train_options) for label, (train_options, _) in variants.items()}
    log("train: " + ", ".join(f"{label} x {count}" for label, (_, count) in variants.items()) + ", round robin")
    times = train_step_times(cfgs, ctx.sizes.warmup_steps, {label: count for label, (_, count) in variants.items()})
    teacher_times = times.pop(f"{online_label} / teacher")
    medians, rows = {label: statistics.median(values) for label, values in times.items()}, []
    for label, values in times.items():
        rows.append([label, len(values), f"{medians[label]:.2f}", f"{min(values):.2f}", f"{max(values):.2f}",
                     f"{medians[label] / medians[no_kd_label]:.2f}"])
    cfg = next(iter(cfgs.values()))
    no_kd, cached_infonce, online = medians[no_kd_label], medians[cached_label], medians[online_label]
    lines = [f"Student {STUDENT_CONFIG.relative_to(REPO)} (CenterPoint pillar, half width) on the {len(ctx.keys)} "
             f"frames, batch {cfg.train_dataloader.batch_size}, its own augmenting train pipeline and DataLoader "
             f"({cfg.train_dataloader.num_workers} worker), cached feature layers paired by name (all 4) for the "
             "feature terms, the six tasks' class heatmaps for `heatmap`, their regression outputs (30 layers) for "
             "`reg`, the teacher's boxes for `label` and reg's teacher peaks, torch threads "
             f"{torch.get_num_threads()}, mmengine's InfiniteSampler (no epoch restarts of the tiny dataset). Step = "
             "next batch + `train_step` (preprocess, loss, backward, update) after "
             f"{ctx.sizes.warmup_steps} untimed warm-up step(s) per variant; the variants take turns step by step "
             "(round robin, the same batches in the same order), so machine drift reaches all alike. The cache holds "
             "figure 3's layers (default codec), the teacher's head outputs (`--head-outputs all`, default codecs) and "
             "boxes (`--boxes`), built here like figure 3's. Cached variants: each feature term and `heatmap` of "
             "`trainer/terms/` alone (`--kd NAME=W`), infonce+pkd, heatmap+infonce, heatmap+reg, "
             "heatmap+reg+label and the focal heatmap loss with reg (`heatmap=1:loss=focal,reg=1`) together (the "
             "seeded teacher's boxes are noise: label KD adds those that are plausible, up to hundreds per scan, to "
             "the GT, which makes that variant's target assignment heavier than a trained teacher's would). Online "
             "KD runs the voxel0075 teacher in the training "
             "process on the student's batch, with infonce, compared with the cached infonce variant.", ""]
    lines += table(["variant", "steps", "median s/step", "min", "max", "/ no KD"], rows)
    # What online KD costs over cached KD should be the teacher alone: compare with the time the online
    # steps spent getting the teacher's maps (same process, same batches), and with figure 3's forward.
    # "Within noise" = within the spread (max - min) of the two compared variants' steps.
    batch = cfg.train_dataloader.batch_size
    saved, in_step = online - cached_infonce, statistics.median(teacher_times)
    noise = (max(times[online_label]) - min(times[online_label])) + (max(times[cached_label]) - min(times[cached_label]))
    lines += ["", f"Online - cached (infonce) = {saved:.2f} s/step. The online steps spent {in_step:.2f} s/step (median) "
                  f"getting the teacher's maps (its voxelisation and forward on the batch of {batch}); difference "
                  f"{saved - in_step:+.2f} s, noise (step spread of both variants) {noise:.2f} s. For comparison, "
                  f"figure 3's forward-only run: {ctx.forward_s_per_sample:.2f} s/sample, un-augmented scans, batch 1, "
                  "alone in its process."]
    targets = [Target(f"cached-KD ({name}) / no-KD step time", "<= 1.10",
                      f"{medians[f'cached KD, {name}'] / no_kd:.2f}", medians[f"cached KD, {name}"] / no_kd <= 1.10)
               for name in cached]
    return Section("7. Training step", lines, targets + [
        Target("online-KD / cached-KD step time (infonce)", "report", f"{online / cached_infonce:.2f}", None),
        Target("online - cached step time vs the teacher's time in the online step", f"equal within noise ({noise:.2f} s)",
               f"{saved:.2f} s vs {in_step:.2f} s",
               abs(saved - in_step) <= noise if min(len(times[online_label]), len(times[cached_label])) > 1 else None)])


# In this order: figures 2 and 6 use the codec caches of figure 1, figures 2, 4 and 5 the scale caches.
STEPS: tuple[Callable[[Context], Section | None], ...] = (
    figure_build, figure_storage, measure_codec_reads, make_scale_caches, figure_read, figure_scale, figure_hdf5,
    figure_cost, figure_train, figure_response)


# -- report -----------------------------------------------------------------------------------

def header(ctx: Context, wall_s: float, quick: bool) -> list[str]:
    """Date, machine, versions, sizes, cold-read method, wall time."""
    from featcache.format import library_versions
    import h5py

    versions = {**library_versions(), "h5py": h5py.__version__, "python": platform.python_version()}
    return [
        "# featcache benchmarks", "",
        f"Generated by `python tools/bench.py{' --quick' if quick else ''}` on "
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; every figure below is measured "
        "by that run (do not edit by hand, re-run the script).", "",
        f"- machine: {len(os.sched_getaffinity(0))} cores (nproc), {cpu_model()}, {memory_total_gib():.0f} GiB RAM, "
        f"Linux {platform.release()}; 1-minute load average {ctx.load_at_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (other jobs may share the machine)",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- sizes: {ctx.sizes.frames} real teacher frames (the real nuScenes scan + rigidly transformed copies), "
        f"scale N={ctx.sizes.scale_rows}; {'QUICK smoke-test sizes, not representative' if quick else 'full run'}",
        "- teacher: mmdet3d `centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py` "
        "(BEVFusion-lidar's encoder/backbone/neck), seeded untrained checkpoint with perturbed BN statistics "
        "(tests/lidar_fixtures.teacher_checkpoint, seed 5); layers pts_middle_encoder 256x180x180, "
        "pts_backbone.0 128x180x180, pts_backbone.1 256x90x90, pts_neck.0 512x180x180",
        f"- torch threads {torch.get_num_threads()} (spconv on CPU is deterministic only single-threaded)",
        f"- page cache: warm = after an untimed pass; {cold_method(ctx)}",
        f"- wall time of this run: {wall_s / 60:.1f} min", ""]


def render(ctx: Context, sections: list[Section], wall_s: float, quick: bool) -> str:
    """The whole BENCHMARKS.md text: header, target summary, one section per figure."""
    lines = header(ctx, wall_s, quick)
    summary = [[section.title, target.name, target.goal, target.measured, verdict(target.passed)]
               for section in sections for target in section.targets]
    lines += ["## Targets", ""] + table(["figure", "target", "goal", "measured", "result"], summary) + [""]
    for section in sorted(sections, key=lambda item: item.title):
        lines += [f"## {section.title}", ""] + section.lines + [""]
        if section.targets:
            lines += table(["target", "goal", "measured", "result"],
                           [[t.name, t.goal, t.measured, verdict(t.passed)] for t in section.targets]) + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 3 min)")
    parser.add_argument("--out", default=None,
                        help="report path (default: BENCHMARKS.md in the repo; with --quick: print only)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per student run in the cost model")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    from mmengine.logging import MMLogger

    torch.set_num_threads(1)
    MMLogger.get_instance("featcache-bench", log_level="WARNING")  # mmengine's current logger: no dataset tables
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        ctx = prepare(sizes, args.epochs, work)
        sections = []
        for step in STEPS:
            section = step(ctx)
            if section is not None:
                sections.append(section)
                log("\n".join([f"## {section.title}", *section.lines, *(
                    f"{t.name}: {t.measured} (goal {t.goal}) {verdict(t.passed)}" for t in section.targets)]))
        report = render(ctx, sections, time.perf_counter() - START, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or (None if args.quick else str(REPO / "BENCHMARKS.md"))
    if out:
        Path(out).write_text(report + "\n")
        log(f"wrote {out}")
    else:
        print(report)
    log(f"done in {(time.perf_counter() - START) / 60:.1f} min")


if __name__ == "__main__":
    main()
