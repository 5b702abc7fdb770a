"""Evaluate the demo's models and write its report (markdown table + PNG plots) from this run only.

Every number comes from the files of the run it describes: mAP and latency are measured here on the
val split, step times and losses come from mmengine's ``vis_data/scalars.json`` of each training
run, stage times from the demo script's timings file.

Usage (tools/demo.sh calls it)::

    python tools/demo_report.py --out REPORT.md --cache CACHE --timings TIMINGS.tsv \\
        --teacher CONFIG CKPT --student NAME CONFIG RUN_DIR [--student ...] \\
        --online NAME RUN_DIR --baseline KD_NAME NOKD_NAME [--cfg-options KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import math
import os
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from featcache import open_cache
from featcache.teacher import models
from featcache.teacher.recording import record_teacher
from featcache.teacher.options import parse_cfg_options
from featcache.teacher.samples import dataset_keys
from trainer.evaluation import Evaluation, evaluate_checkpoint

DETECTION_KEYS = ("loss_heatmap", "loss_bbox")


@dataclass
class Run:
    name: str
    config: str
    run_dir: str

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.run_dir, "student.pth")

    def scalars(self) -> list[dict]:
        """mmengine's logged training scalars (one line per logging interval), newest run dir."""
        files = sorted(glob.glob(os.path.join(self.run_dir, "*", "vis_data", "scalars.json")))
        if not files:
            raise FileNotFoundError(f"no vis_data/scalars.json under {self.run_dir}: did `featcache train` run?")
        with open(files[-1]) as stream:
            return [json.loads(line) for line in stream if line.strip()]

    def step_time(self) -> float:
        """Median logged iteration time (s), first logging window (warm-up) left out."""
        times = [row["time"] for row in self.scalars() if "time" in row]
        return statistics.median(times[1:] if len(times) > 1 else times)

    @functools.cached_property
    def run_config(self):
        """The config ``featcache train`` dumped into the run dir (None when there is none)."""
        cfg_path = os.path.join(self.run_dir, os.path.basename(self.config))
        if not os.path.exists(cfg_path):
            return None
        from mmengine.config import Config

        return Config.fromfile(cfg_path)

    def kd_mode(self) -> str:
        cfg = self.run_config
        if cfg is None:
            return "?"
        inherit = " + teacher's weights" if self.inherits() else ""
        if cfg.model.get("type") != "CacheDistiller":
            return "none" + inherit
        return ",".join(f"{name}={params.get('weight', 1.0):g}"
                        for name, params in cfg.model.get("terms", {}).items()) + inherit

    def inherits(self) -> bool:
        """Whether the run started from the teacher's sliced weights (``--init-from-teacher``)."""
        return self.run_config is not None and bool(self.run_config.get("init_from_teacher"))


def _detection_loss(row: dict) -> float:
    return sum(value for key, value in row.items() if key.endswith(DETECTION_KEYS))


def _kd_loss(row: dict) -> float | None:
    values = [value for key, value in row.items() if key.startswith("loss_kd")]
    return sum(values) if values else None


def plot_losses(runs: list[Run], out_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_det, ax_kd) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in runs:
        rows = [row for row in run.scalars() if "loss" in row]
        steps = [row["step"] for row in rows]
        marker = "o" if len(rows) < 20 else None  # short (--quick) runs log a few points only
        ax_det.plot(steps, [_detection_loss(row) for row in rows], label=run.name, marker=marker)
        kd = [_kd_loss(row) for row in rows]
        if any(value is not None for value in kd):
            ax_kd.plot(steps, kd, label=run.name, marker=marker)
    ax_det.set(title="detection loss (heatmap + bbox, all tasks)", xlabel="iteration", yscale="log")
    ax_kd.set(title="distillation loss (alpha x loss_kd)", xlabel="iteration")
    for axis in (ax_det, ax_kd):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _norm_map(feature: torch.Tensor) -> np.ndarray:
    """Per-cell L2 norm over channels, scaled to [0, 1]: where a BEV map carries signal."""
    norm = feature.float().norm(dim=0).numpy()
    return norm / max(float(norm.max()), 1e-12)


def plot_bev(cache_path: str, runs: list[Run], cfg_options: dict, out_png: str) -> str:
    """The cached teacher map of the first cached sample beside each student's map of the same scan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mmengine.dataset import pseudo_collate

    cache = open_cache(cache_path)
    layer = cache.layer_names[0]
    key = cache.row_keys[0]
    teacher_map = torch.from_numpy(np.asarray(cache.read(key)[layer]))
    panels = [(f"teacher (from the cache)\n{layer} {tuple(teacher_map.shape)}", _norm_map(teacher_map))]
    for run in runs:
        cfg = models.load_config(run.config, cfg_options)
        student = models.build_model(cfg, run.checkpoint).eval()
        dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, cache.manifest.split))
        index = dataset_keys(dataset).index(key)
        with torch.no_grad():
            outputs = record_teacher(student, pseudo_collate([dataset[index]]), [cache.manifest.layer(layer).module])
        student_map = outputs[layer][0]
        panels.append((f"{run.name}\n{layer} {tuple(student_map.shape)}", _norm_map(student_map)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3))
    for axis, (title, image) in zip(np.atleast_1d(axes), panels):
        axis.imshow(image, origin="lower", cmap="viridis")
        axis.set_title(title, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.suptitle(f"BEV feature norm per cell (each scaled to its max), sample {key}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--timings", required=True)
    parser.add_argument("--teacher", nargs=2, metavar=("CONFIG", "CKPT"), required=True)
    parser.add_argument("--student", nargs=3, action="append", metavar=("NAME", "CONFIG", "RUN_DIR"), required=True)
    parser.add_argument("--online", nargs=2, metavar=("NAME", "RUN_DIR"), required=True,
                        help="the run with a live teacher, and which cached run it mirrors")
    parser.add_argument("--baseline", nargs=2, metavar=("KD_NAME", "NOKD_NAME"), required=True)
    parser.add_argument("--cfg-options", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--deployment", metavar="REPORT_MD",
                        help="tools/deploy_report.py's report of this run's models, embedded as a section")
    args = parser.parse_args()
    cfg_options = parse_cfg_options(args.cfg_options)
    out_dir = os.path.dirname(os.path.abspath(args.out))

    runs = [Run(name, config, run_dir) for name, config, run_dir in args.student]
    by_name = {run.name: run for run in runs}
    teacher_config, teacher_ckpt = args.teacher
    evaluations: dict[str, Evaluation] = {"teacher": evaluate_checkpoint(teacher_config, teacher_ckpt, cfg_options)}
    for run in runs:
        evaluations[run.name] = evaluate_checkpoint(run.config, run.checkpoint, cfg_options)
    teacher = evaluations["teacher"]
    classes = [key[3:] for key in teacher.metrics if key.startswith("AP_")]

    losses_png = plot_losses(runs, os.path.join(out_dir, "loss_curves.png"))
    bev_png = plot_bev(args.cache, runs, cfg_options, os.path.join(out_dir, "bev_features.png"))

    lines = ["# featcache demo report", "",
             f"Val split ({teacher.num_samples} generated scans); nuScenes-style center-distance AP "
             "(thresholds 0.5/1/2/4 m, nuscenes-devkit matching) within 32 m. CPU latency: median "
             "per-scan predict time at batch 1 (voxelisation, network, decoding, NMS) on this machine "
             f"({torch.get_num_threads()} torch threads).", "",
             "| model | config | KD | params | % of teacher | CPU latency ms | mAP | "
             + " | ".join(f"AP {name}" for name in classes) + " | mAP retention | train step s |",
             "|" + "---|" * (9 + len(classes))]
    for name, evaluation in evaluations.items():
        run = by_name.get(name)
        config = teacher_config if run is None else run.config
        retention = evaluation.metrics["mAP"] / teacher.metrics["mAP"] if teacher.metrics["mAP"] > 0 else math.nan
        lines.append(
            f"| {name} | `{config}` | {'-' if run is None else run.kd_mode()} | {evaluation.num_parameters:,} | "
            f"{100 * evaluation.num_parameters / teacher.num_parameters:.1f} | {evaluation.latency_ms:.1f} | "
            f"{_fmt(evaluation.metrics['mAP'])} | "
            + " | ".join(_fmt(evaluation.metrics[f"AP_{c}"]) for c in classes)
            + f" | {_fmt(retention, 2)} | {'-' if run is None else _fmt(run.step_time())} |")

    online_name, online_dir = args.online
    cached_run = by_name[online_name]
    online = Run(f"{online_name} (online teacher)", cached_run.config, online_dir)
    kd_name, nokd_name = args.baseline
    cached_s, online_s, nokd_s = cached_run.step_time(), online.step_time(), by_name[nokd_name].step_time()
    lines += ["", "## Training step time (same student and batch size, median logged iteration time)", "",
              "| run | step s | vs no-KD |", "|---|---|---|",
              f"| {nokd_name}: no distillation | {nokd_s:.3f} | 1.00 |",
              f"| {online_name}: KD targets from the cache | {cached_s:.3f} | {cached_s / nokd_s:.2f} |",
              f"| {online_name}: KD targets from the teacher run online | {online_s:.3f} | {online_s / nokd_s:.2f} |",
              "", f"Online / cached KD step time: **{online_s / cached_s:.2f}x** (the teacher forward the cache saves).",
              ""]

    kd_map, nokd_map = evaluations[kd_name].metrics["mAP"], evaluations[nokd_name].metrics["mAP"]
    delta = kd_map - nokd_map
    lines += ["## Distillation from the cache vs no distillation (this run only)", "",
              "Same student config, data, schedule and seed"
              + (" (the KD arm starts from the teacher's weights sliced to the student's widths, "
                 "`--init-from-teacher`; the no-KD arm from the seed's random weights): "
                 if by_name[kd_name].inherits() and not by_name[nokd_name].inherits()
                 else " (so the same initial weights): ")
              + f"**{kd_name}** (KD "
              f"`{by_name[kd_name].kd_mode()}`) reaches mAP {kd_map:.4f}, **{nokd_name}** {nokd_map:.4f}, a "
              f"difference of {delta:+.4f} mAP in this one run. One run per arm draws no verdict: the same demo "
              "run twice has moved this difference by more than 0.04. Whether a recipe really beats no-KD is "
              "what `QUALITY.md` measures (several seeds per recipe, mean, spread and gap; `tools/quality.py`).",
              ""]

    if args.deployment:  # its own headings one level down: a section of this report
        with open(args.deployment) as stream:
            deployment = stream.read().splitlines()
        lines += ["## Deployment (ONNX Runtime): `tools/deploy_report.py` on this run's models", ""]
        lines += [("#" + line) if line.startswith("#") else line for line in deployment[1:]] + [""]

    with open(args.timings) as stream:
        stages = [line.rstrip("\n").split("\t") for line in stream if line.strip()]
    lines += ["## Stage wall times (this run)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {name} | {int(ms) / 1000:.1f} |" for name, ms in stages]
    lines += ["", "## Plots", "", f"![loss curves]({os.path.basename(losses_png)})", "",
              f"![BEV features]({os.path.basename(bev_png)})", ""]
    with open(args.out, "w") as stream:
        stream.write("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as stream:
        json.dump({name: {"metrics": e.metrics, "latency_ms": e.latency_ms, "params": e.num_parameters}
                   for name, e in evaluations.items()} | {"step_time_s": {
                       "no_kd": nokd_s, "cached_kd": cached_s, "online_kd": online_s}}, stream, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
