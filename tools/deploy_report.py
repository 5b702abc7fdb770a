"""Deployment report: each model exported with ``featcache deploy`` and measured in every form it runs in.

For every ``--model NAME CONFIG CHECKPOINT`` (the teacher first): parameters, ONNX file sizes, batch-1
CPU latency of PyTorch/mmdet3d (``data_preprocessor`` + ``predict``), ONNX Runtime fp32 and, with
``--int8``, the statically quantised graph, each at 1 and 2 threads (median and p90 over the val
scans of ``--rounds`` interleaved rounds, the first ``--warmup`` of each worker not timed), the peak
resident memory of the processes that ran it (each form in fresh processes: the ORT ones import numpy +
onnxruntime only), and the mAP of each form
with the project's metric (``trainer.evaluation.CenterDistanceMetric`` on the config's test split, the
same GT, so the forms differ only in their predictions). Also the largest ONNX-vs-PyTorch difference of
the raw head outputs over the val scans, and the ratios issue #18 targets. Every number is measured by
the run that writes the report.

What each latency includes: PyTorch from the loaded points (the test pipeline's loading and range filter
outside the timer, as ``trainer.evaluation.evaluate_checkpoint`` times it) to its boxes; ONNX Runtime
from the loaded array (range filter, voxelisation, graph, decoding, NMS inside the timer).

Usage::

    python tools/deploy_report.py --out work_dirs/deploy/report.md --work-dir work_dirs/deploy \\
        --model teacher configs/demo/teacher_pillar.py checkpoints/demo_teacher_pillar.pth \\
        --model slim_kd configs/demo/student_slim.py work_dirs/demo/student_slim_kd/student.pth \\
        [--int8] [--quick 5] [--cfg-options test_dataloader.dataset.data_root=data/generated/demo/]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from featcache.deploy.evaluation import (latency_stats, raw_output_difference, run_form,  # noqa: E402
                                         score_predictions, val_samples)
from trainer.quality.plan import quality_retention  # noqa: E402

FORMS = ("pytorch", "fp32", "int8")
FORM_LABELS = {"pytorch": "PyTorch (mmdet3d)", "fp32": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}


def run_worker(job: dict) -> dict:
    """``run_form`` in a new interpreter limited to ``job['threads']`` threads; its result JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"])}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)], env=env,
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{job['form']} worker failed for {job.get('name')}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ main
@dataclass
class FormResult:
    latency: dict[int, tuple[float, float]] = field(default_factory=dict)  # threads -> (median ms, p90 ms)
    peak_rss_mb: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: str = ""


@dataclass
class ModelResult:
    name: str
    config: str
    checkpoint: str
    params: int = 0
    onnx_mb: dict[str, float] = field(default_factory=dict)
    raw_max_abs_diff: float = math.nan
    forms: dict[str, FormResult] = field(default_factory=dict)




def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def measure(args, cfg_options: dict) -> tuple[list[ModelResult], dict]:
    """Export every model, then time every (model, form, threads) in ``args.rounds`` interleaved rounds,
    the order reversed in every other round, one fresh worker process each: a slow spell of the machine
    then reaches every form alike instead of one form's whole window (in one-pass runs a single form's
    latency moved by 1.4x between two runs of the same graphs). Latency = median / p90 over all rounds'
    timed scans; peak memory = the largest of its workers; mAP from the first round's predictions."""
    from featcache.deploy.export import export_detector
    from featcache.deploy.spec import SPEC_FILE

    results, jobs = [], []
    scans: list[str] = []
    context: dict = {}
    scored = {}
    for name, config, checkpoint in args.model:
        result = ModelResult(name, config, checkpoint)
        cfg, paths, samples = val_samples(config, cfg_options, args.quick)
        scans = paths
        export_dir = os.path.join(args.work_dir, name)
        if os.path.isdir(export_dir) and not os.path.isfile(os.path.join(export_dir, SPEC_FILE)) and os.listdir(export_dir):
            raise SystemExit(f"{export_dir} exists and is not a featcache export; choose another --work-dir")
        start = time.perf_counter()
        spec = export_detector(config, checkpoint, export_dir, overwrite=True, cfg_options=cfg_options,
                               quantize="int8" if args.int8 else None, calibration_scans=args.calibration_scans).spec
        context.setdefault("export_s", {})[name] = time.perf_counter() - start
        result.params = int(spec.source["num_parameters"])
        result.onnx_mb["fp32"] = os.path.getsize(os.path.join(export_dir, spec.onnx.file)) / 1e6
        forms = ["pytorch", "fp32"] + (["int8"] if spec.onnx.int8 else [])
        if spec.onnx.int8:
            result.onnx_mb["int8"] = os.path.getsize(os.path.join(export_dir, spec.onnx.int8["file"])) / 1e6
        result.raw_max_abs_diff = raw_output_difference(config, checkpoint, export_dir, paths, cfg_options)
        for form in forms:
            result.forms[form] = FormResult()
            for threads in args.threads:
                jobs.append((result, form, threads, {
                    "name": name, "form": form, "config": config, "checkpoint": checkpoint, "export_dir": export_dir,
                    "scans": paths, "threads": threads, "warmup": args.warmup, "cfg_options": cfg_options}))
        scored[name] = (cfg, samples)
        results.append(result)
    times: dict[tuple[str, str, int], list[float]] = {}
    for round_index in range(args.rounds):
        for result, form, threads, job in (jobs if round_index % 2 == 0 else jobs[::-1]):
            out = os.path.join(args.work_dir, f"{result.name}.{form}.t{threads}.r{round_index}.npz")
            measured = run_worker({**job, "out": out})
            times.setdefault((result.name, form, threads), []).extend(measured["times_s"])
            outcome = result.forms[form]
            outcome.peak_rss_mb = max(measured["peak_rss_mb"], 0 if math.isnan(outcome.peak_rss_mb)
                                      else outcome.peak_rss_mb)
            if form != "pytorch" and measured["heavy_modules_loaded"]:
                raise RuntimeError(f"the {form} runtime loaded {measured['heavy_modules_loaded']}")
            if round_index == 0 and threads == args.threads[0]:
                outcome.predictions = out
        print(f"timing round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    for result, form, threads, _ in jobs:
        result.forms[form].latency[threads] = latency_stats(times[(result.name, form, threads)])
    for result in results:
        cfg, samples = scored[result.name]
        for form, outcome in result.forms.items():
            outcome.metrics = score_predictions(cfg, samples, outcome.predictions)
    context["num_scans"] = len(scans)
    context["rounds"] = args.rounds
    return results, context


def write_report(results: list[ModelResult], context: dict, args, out: str) -> dict:
    threads = args.threads
    teacher = results[0]
    lines = ["# Deployment report", "",
             f"Generated by `tools/deploy_report.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{context['num_scans']} val scans (first {args.warmup} of each run not timed), "
             f"{context['rounds']} interleaved timing rounds (every form of every model once per round, the order "
             "reversed in every other round), batch 1, CPU "
             f"({os.cpu_count()} cores, {platform.machine()}; load average {os.getloadavg()[0]:.1f} when it started). "
             "Latency: median / p90 ms per scan over all rounds. Peak memory: maximum resident set of the processes "
             "that ran the form (a fresh process per form, thread count and round; the ONNX Runtime ones import "
             "numpy and onnxruntime only). mAP: "
             "nuScenes centre-distance mAP (`trainer/evaluation.py`) on the same scans and GT.", "",
             "| model | form | params | ONNX MB | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} ms" for t in threads)
             + " | peak RSS MB | mAP | mAP - PyTorch |", "|" + "---|" * (7 + len(threads))]
    for result in results:
        reference = result.forms["pytorch"].metrics.get("mAP", math.nan)
        for form, outcome in result.forms.items():
            latency = " | ".join(f"{_fmt(outcome.latency[t][0])} / {_fmt(outcome.latency[t][1])}" for t in threads)
            size = "-" if form == "pytorch" else _fmt(result.onnx_mb.get(form, math.nan), 2)
            value = outcome.metrics.get("mAP", math.nan)
            delta = "-" if form == "pytorch" else f"{value - reference:+.4f}"
            lines.append(f"| {result.name} | {FORM_LABELS[form]} | {result.params:,} | {size} | {latency} | "
                         f"{_fmt(outcome.peak_rss_mb, 0)} | {_fmt(value, 4)} | {delta} |")
    lines += ["", "Raw head outputs, ONNX Runtime fp32 vs PyTorch, largest absolute difference over every output of "
              "every scan: " + ", ".join(f"{r.name} {r.raw_max_abs_diff:.2g}" for r in results)
              + " (target < 1e-4).", ""]

    def median(result: ModelResult, form: str, t: int = threads[0]) -> float:
        return result.forms[form].latency[t][0] if form in result.forms else math.nan

    quality = quality_retention(args.quality, args.quality_recipe, [r.config for r in results[1:]])

    def retention(result: ModelResult, form: str) -> float:
        return result.forms[form].metrics["mAP"] / teacher.forms["pytorch"].metrics["mAP"] \
            if teacher.forms["pytorch"].metrics.get("mAP") else math.nan

    ratios = []
    checks = {}
    lines += [f"## Ratios ({threads[0]} thread, median latency)", "",
              "mAP retention: the student's mAP / the teacher's PyTorch mAP, on this run's scans; and as QUALITY.md "
              f"measures it (recipe `{args.quality_recipe}` from the cache, mean over its seeds on the whole val split, "
              "/ its teacher mAP)" if args.quality_recipe else "mAP retention: the student's mAP / the teacher's "
              "PyTorch mAP, on this run's scans.", "",
              "| comparison | speed-up | target | mAP retention | QUALITY.md retention |", "|---|---|---|---|---|"]
    for result in results:
        speedup = median(result, "pytorch") / median(result, "fp32")
        studied = quality.get(result.config)
        ratios.append((f"{result.name}: ONNX Runtime fp32 vs PyTorch", speedup, 1.5, retention(result, "fp32"), studied))
        if "int8" in result.forms:
            ratios.append((f"{result.name}: int8 vs fp32 ONNX Runtime", median(result, "fp32") / median(result, "int8"),
                           1.5, retention(result, "int8"), None))
    for result in results[1:]:
        studied = quality.get(result.config)
        ratios.append((f"{result.name} vs teacher, both ONNX Runtime fp32",
                       median(teacher, "fp32") / median(result, "fp32"), 2.0, retention(result, "fp32"), studied))
        ratios.append((f"{result.name} in ONNX Runtime fp32 vs teacher in PyTorch",
                       median(teacher, "pytorch") / median(result, "fp32"), 3.0, retention(result, "fp32"), studied))
    for label, value, target, kept, studied in ratios:
        verdict = "met" if value >= target else "not met"
        checks[label] = {"speedup": value, "target": target, "met": bool(value >= target), "retention": kept,
                         "quality_retention": None if studied is None else studied[0]}
        quality_cell = "-" if studied is None else f"{studied[0]:.3f} ({studied[1]} seeds)"
        lines.append(f"| {label} | {value:.2f}x | >= {target}x ({verdict}) | {_fmt(kept, 3)} | {quality_cell} |")
    lines += ["", "Parameters vs the teacher: " + ", ".join(
        f"{r.name} {100 * r.params / teacher.params:.1f}%" for r in results[1:]) + ".", ""]
    with open(out, "w") as stream:
        stream.write("\n".join(lines))
    summary = {"num_scans": context["num_scans"], "threads": threads, "checks": checks,
               "models": {r.name: {"params": r.params, "onnx_mb": r.onnx_mb, "raw_max_abs_diff": r.raw_max_abs_diff,
                                   "forms": {f: {"latency_ms": {str(t): v for t, v in o.latency.items()},
                                                 "peak_rss_mb": o.peak_rss_mb, "metrics": o.metrics}
                                             for f, o in r.forms.items()}} for r in results}}
    with open(os.path.splitext(out)[0] + ".json", "w") as stream:
        json.dump(summary, stream, indent=1)
    print("\n".join(lines))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--work-dir", default="work_dirs/deploy")
    parser.add_argument("--model", nargs=3, action="append", metavar=("NAME", "CONFIG", "CHECKPOINT"),
                        help="the first is the teacher the ratios refer to")
    parser.add_argument("--int8", action="store_true", help="also build and measure the int8 model")
    parser.add_argument("--calibration-scans", type=int, default=None,
                        help="int8 calibration scans (default: featcache deploy's)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quality", default=os.path.join(REPO, "quality.json"),
                        help="QUALITY.md's run records, for each student's retention as it measures it")
    parser.add_argument("--quality-recipe", default=None, metavar="RECIPE",
                        help="the recipe the students were trained with, as tools/quality.py names it "
                             "(e.g. heatmap=10,reg=1,init)")
    parser.add_argument("--quick", type=int, default=None, metavar="N", help="only the first N val scans")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved timing rounds (each form once per round, the order reversed every other)")
    parser.add_argument("--cfg-options", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_form(json.loads(args.worker))))
        return
    if not args.out or not args.model:
        parser.error("--out and at least one --model are required")
    from featcache.teacher.options import parse_cfg_options

    cfg_options = parse_cfg_options(args.cfg_options)
    if args.quick is not None and args.quick <= args.warmup:
        parser.error(f"--quick {args.quick} must exceed --warmup {args.warmup}")
    os.makedirs(args.work_dir, exist_ok=True)
    results, context = measure(args, cfg_options)
    write_report(results, context, args, args.out)


if __name__ == "__main__":
    main()
