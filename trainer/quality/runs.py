"""One quality run, in its own process: train a student under a recipe and score it (the record quality.json
keeps), and the records file itself.

``python -m trainer.quality.runs SPEC.json`` (cwd: the repository) runs the spec ``run_one`` wrote and leaves
``record.json`` beside it: a fresh process per run, with its own torch threads and generator state.
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.quality.plan import (REPO, TEACHER_CKPT, TEACHER_CONFIG, Run, pseudo_label_score, recipe_parts,
                                  student_config, student_parts, uses_unlabelled)


def data_options(data: Path) -> list[str]:
    return [f"train_dataloader.dataset.data_root={data}/", f"test_dataloader.dataset.data_root={data}/"]


def schedule_options(quick: bool) -> list[str]:
    """The quick size trains one epoch (the demo's --quick schedule)."""
    if not quick:
        return []
    return ["train_cfg.max_epochs=1", "param_scheduler.1.T_max=1", "param_scheduler.1.end=1",
            "default_hooks.logger.interval=1"] + eval_options(quick)


def eval_options(quick: bool) -> list[str]:
    # one-epoch students score near the 0.1 threshold everywhere: cap the boxes NMS sees per task
    return ["model.test_cfg.pts.pre_max_size=100", "model.test_cfg.pts.post_max_size=50"] if quick else []


def train_and_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one student and score it: the record quality.json keeps (run in its own process)."""
    import torch

    from featcache.teacher.options import parse_cfg_options
    from trainer.evaluation import evaluate_checkpoint
    from trainer.terms import parse_kd_spec
    from trainer.train import TrainOptions, train

    run = Run(**spec["run"])
    work_dir = spec["work_dir"]
    config = str(student_config(run.student))
    labelled = student_parts(run.student)[1]
    options = parse_cfg_options(spec["cfg_options"] + [f"randomness.seed={run.seed}"]
                                + ([] if labelled is None else scarce_options(config, spec["cfg_options"], labelled)))
    kd, inherit = recipe_parts(run.recipe)
    common = dict(student_config=config, work_dir=work_dir, cfg_options=options,
                  init_from_teacher=(str(TEACHER_CONFIG), str(TEACHER_CKPT)) if inherit else None)
    if uses_unlabelled(run.recipe):
        if kd is None or labelled is None:
            raise ValueError(f"{run.name}: unlabelled scans need a --kd recipe and a scarce-label student (student@N)")
        common["unlabelled"] = dict(ann_file=write_unlabelled_rest(config, spec["cfg_options"], labelled, work_dir),
                                    pseudo_labels=pseudo_label_score(run.recipe))
    if kd is None:
        train_options = TrainOptions(cache=None, no_distill=True, **common)
    elif run.targets == "online":
        train_options = TrainOptions(cache=None, kd=parse_kd_spec(kd), online_teacher=(
            str(TEACHER_CONFIG), str(TEACHER_CKPT)), teacher_cfg_options=parse_cfg_options(spec["cfg_options"]),
            **common)
    else:
        train_options = TrainOptions(cache=spec["cache"], kd=parse_kd_spec(kd), **common)
    start = time.perf_counter()
    train(train_options)
    train_s = time.perf_counter() - start
    evaluation = evaluate_checkpoint(config, os.path.join(work_dir, "student.pth"),
                                     parse_cfg_options(spec["cfg_options"]))
    metrics = evaluation.metrics
    return {**asdict(run), "key": spec["key"], "mAP": metrics["mAP"],
            "AP": finite_or_none({name[3:]: value for name, value in metrics.items() if name.startswith("AP_")}),
            "params": evaluation.num_parameters, "train_s": round(train_s, 1), "step_s": median_step_time(work_dir),
            "torch_threads": torch.get_num_threads(), "finished": now()}


def _train_infos(config: str, cfg_options: list[str]) -> tuple[Any, str]:
    """The student config (with the run's options) and the path of its train info file."""
    from featcache.teacher import models
    from featcache.teacher.options import parse_cfg_options

    cfg = models.load_config(config, parse_cfg_options(cfg_options))
    dataset = models.unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    return cfg, os.path.join(str(dataset.get("data_root") or ""), str(dataset["ann_file"]))


def scarce_options(config: str, cfg_options: list[str], labelled: int) -> list[str]:
    """Only the first ``labelled`` train scans (mmengine's ``indices``), trained the iterations the full split
    trains: ``max_epochs`` scaled by the batches per epoch, the cosine's length with it (``param_scheduler.1``, the
    demo students' CosineAnnealingLR, converted to iterations)."""
    import math

    from featcache.teacher.unlabelled import load_infos

    cfg, infos = _train_infos(config, cfg_options)
    total = len(load_infos(infos)["data_list"])
    if not 0 < labelled < total:
        raise ValueError(f"{labelled} labelled scans: the train split holds {total}; give 0 < N < {total}")
    batch = int(cfg.train_dataloader.batch_size)
    iterations = int(cfg.train_cfg.max_epochs) * math.ceil(total / batch)
    epochs = max(1, round(iterations / math.ceil(labelled / batch)))
    # one checkpoint at the end, not one per (tiny) epoch: saving moves no result, and 160 of them cost minutes
    return [f"train_dataloader.dataset.indices={labelled}", f"train_cfg.max_epochs={epochs}",
            f"param_scheduler.1.T_max={epochs}", f"param_scheduler.1.end={epochs}",
            f"default_hooks.checkpoint.interval={epochs}"]


def write_unlabelled_rest(config: str, cfg_options: list[str], labelled: int, work_dir: str) -> str:
    """An info file of the train scans past the first ``labelled``, as unlabelled scans (their annotations
    dropped, keyed as in the benchmark's cache, which holds their targets); returns its path."""
    from featcache.teacher.unlabelled import UNLABELLED as FIELD
    from featcache.teacher.unlabelled import load_infos, write_infos

    _, path = _train_infos(config, cfg_options)
    infos = load_infos(path)
    rest = [{**info, "instances": [], FIELD: True} for info in infos["data_list"][labelled:]]
    # absolute: a relative ann_file is read below the dataset's data_root (mmengine's rule)
    return write_infos(os.path.abspath(os.path.join(work_dir, f"unlabelled_after_{labelled}.pkl")), rest,
                       infos.get("metainfo", {}))


def median_step_time(work_dir: str) -> float | None:
    """Median logged iteration time (s) of the run, the first logging window (warm-up) left out."""
    files = sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json")))
    if not files:
        return None
    with open(files[-1]) as stream:
        times = [json.loads(line)["time"] for line in stream if '"time"' in line]
    return round(statistics.median(times[1:] if len(times) > 1 else times), 4) if times else None


def finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    """AP per class with NaN (a class absent from the val split) as None: quality.json stays strict JSON."""
    return {name: (None if value != value else value) for name, value in values.items()}


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def evaluate_teacher(data: Path, quick: bool) -> dict[str, Any]:
    from featcache.teacher.options import parse_cfg_options
    from trainer.evaluation import evaluate_checkpoint

    evaluation = evaluate_checkpoint(str(TEACHER_CONFIG), str(TEACHER_CKPT),
                                     parse_cfg_options(data_options(data) + eval_options(quick)))
    return {"mAP": evaluation.metrics["mAP"], "params": evaluation.num_parameters,
            "AP": finite_or_none({name[3:]: value for name, value in evaluation.metrics.items()
                                  if name.startswith("AP_")})}


def run_one(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    """Train + evaluate in a fresh process (its own torch threads and generator state)."""
    os.makedirs(spec["work_dir"], exist_ok=True)
    spec_path = os.path.join(spec["work_dir"], "spec.json")
    with open(spec_path, "w") as stream:
        json.dump(spec, stream)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_path = os.path.join(spec["work_dir"], "run.log")
    with open(log_path, "w") as stream:
        result = subprocess.run([sys.executable, "-m", "trainer.quality.runs", spec_path], stdout=stream,
                                stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if result.returncode != 0:
        with open(log_path) as stream:
            tail = stream.read()[-2000:]
        raise RuntimeError(f"run {spec['run']} failed (exit {result.returncode}); log {log_path}:\n{tail}")
    with open(os.path.join(spec["work_dir"], "record.json")) as stream:
        return json.load(stream)


def load(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"teacher": None, "runs": [], "superseded_runs": []}


def save(path: Path, state: dict[str, Any]) -> None:
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
    os.replace(partial, path)



def run_spec(path: str) -> None:
    """Train and score the run a spec file (``run_one``'s) describes; its record goes to ``record.json`` beside it."""
    with open(path) as stream:
        spec = json.load(stream)
    record = train_and_evaluate(spec)
    with open(os.path.join(spec["work_dir"], "record.json"), "w") as stream:
        json.dump(record, stream)


if __name__ == "__main__":
    run_spec(sys.argv[1])
