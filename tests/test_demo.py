"""`tools/demo.sh --quick`: the README's main job, whole chain at tiny size, on the shipped teacher."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from conftest import REPO

TEACHER = REPO / "checkpoints" / "demo_teacher_pillar.pth"
MODELS = ("teacher", "half_kd", "slim_kd", "half_nokd")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    assert TEACHER.is_file(), f"the shipped demo teacher {TEACHER} is missing (tools/train_demo_teacher.sh makes it)"
    work = tmp_path_factory.mktemp("demo_quick")
    result = subprocess.run(["bash", "tools/demo.sh", "--quick"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "DEMO_WORK_DIR": str(work)}, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work


def centre_distance_map(gt: list[tuple[np.ndarray, np.ndarray]], pred: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                        num_classes: int, thresholds: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> float:
    """nuScenes centre-distance mAP written out from the protocol, apart from ``trainer.evaluation`` (which calls
    nuscenes-devkit): per class and threshold, predictions of all samples highest score first (a tie: the later one
    first, as the devkit sorts), each matched to the nearest untaken GT of its class in its sample if nearer than the
    threshold; precision sampled at 101 recall points (0 past the last recall), the points above recall 0.1 less 0.1
    (floored at 0), averaged and divided by 0.9; no match at all is AP 0. Classes without GT are left out of the mean.
    ``gt``: per sample (xy (N, 2), labels (N,)); ``pred``: per sample (xy, labels, scores)."""
    aps = []
    for label in range(num_classes):
        positives = sum(int((labels == label).sum()) for _, labels in gt)
        if not positives:
            continue
        found = [(float(score), sample, xy) for sample, (xys, labels, scores) in enumerate(pred)
                 for xy, score in zip(xys[labels == label], scores[labels == label])]
        found = [found[i] for i in sorted(range(len(found)), key=lambda i: (found[i][0], i), reverse=True)]
        per_threshold = []
        for threshold in thresholds:
            taken = [np.zeros(len(labels), dtype=bool) for _, labels in gt]
            hits = []
            for _, sample, xy in found:
                xys, labels = gt[sample]
                free = np.flatnonzero((labels == label) & ~taken[sample])
                distances = np.hypot(*(xys[free] - xy).T) if len(free) else np.empty(0)
                hit = bool(len(free)) and distances.min() < threshold
                if hit:
                    taken[sample][free[np.argmin(distances)]] = True
                hits.append(hit)
            if not any(hits):
                per_threshold.append(0.0)
                continue
            true = np.cumsum(hits)
            curve = np.interp(np.linspace(0, 1, 101), true / positives, true / np.arange(1, len(hits) + 1), right=0)
            per_threshold.append(float(np.clip(curve[11:] - 0.1, 0, None).mean() / 0.9))
        aps.append(np.mean(per_threshold))
    return float(np.mean(aps)) if aps else math.nan


def predictions_and_gt(config: str | Path, checkpoint: str | Path, cfg_options: dict):
    """``config``'s model with ``checkpoint`` run on its test split one scan at a time (``model.predict``), and each
    scan's GT as mmdet3d's dataset gives it, both within the config's test_evaluator max_range; label -1 GT and
    unknown labels left out. Returns (gt, pred, class names) for :func:`centre_distance_map`."""
    import torch
    from mmengine.dataset import pseudo_collate

    from featcache.teacher import models

    cfg = models.load_config(config, cfg_options)
    max_range = cfg.test_evaluator["max_range"]
    model = models.build_model(cfg, checkpoint).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "test"))
    classes = list(dataset.metainfo["classes"])
    gt, pred = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            (result,) = model(**model.data_preprocessor(pseudo_collate([item]), False), mode="predict")
            annotations = item["data_samples"].eval_ann_info
            xy, labels = annotations["gt_bboxes_3d"].gravity_center[:, :2].numpy(), np.asarray(annotations["gt_labels_3d"])
            keep = (labels >= 0) & (np.hypot(xy[:, 0], xy[:, 1]) < max_range)
            gt.append((xy[keep], labels[keep]))
            boxes = result.pred_instances_3d
            xy = boxes.bboxes_3d.gravity_center[:, :2].numpy()
            labels, scores = boxes.labels_3d.numpy(), boxes.scores_3d.numpy().astype(np.float64)
            keep = (labels >= 0) & (labels < len(classes)) & (np.hypot(xy[:, 0], xy[:, 1]) < max_range)
            pred.append((xy[keep], labels[keep], scores[keep]))
    return gt, pred, classes


def test_centre_distance_map_agrees_with_the_devkit_on_random_scenes():
    # the check's own arithmetic, on a small fixture: nuscenes-devkit (trainer.evaluation) on the same boxes
    from trainer.evaluation import center_distance_ap

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    gt, pred, gt_boxes, pred_boxes = [], [], {}, {}
    for sample in range(4):
        xy, labels = rng.uniform(-20, 20, (12, 2)), rng.integers(0, 2, 12)  # class c has no GT: left out
        found = np.concatenate([xy[:9] + rng.normal(0, 0.8, (9, 2)), rng.uniform(-20, 20, (6, 2))])
        found_labels, scores = np.concatenate([labels[:9], rng.integers(0, 3, 6)]), rng.uniform(0, 1, 15).round(2)
        gt.append((xy, labels))
        pred.append((found, found_labels, scores))
        gt_boxes[str(sample)] = [((*p, 0.0), (1, 1, 1), 0.0, names[l]) for p, l in zip(xy, labels)]
        pred_boxes[str(sample)] = [((*p, 0.0), (1, 1, 1), 0.0, names[l], float(s))
                                   for p, l, s in zip(found, found_labels, scores)]
    expected = center_distance_ap(gt_boxes, pred_boxes, names).mean_ap
    assert 0.05 < expected < 0.95  # neither trivial end
    assert centre_distance_map(gt, pred, len(names)) == pytest.approx(expected, abs=1e-12)
    # and the ends: every box found exactly is 1, nothing found is 0
    assert centre_distance_map(gt, [(xy, labels, np.ones(len(xy))) for xy, labels in gt], 2) == pytest.approx(1.0)
    assert centre_distance_map(gt, [(np.empty((0, 2)), np.empty(0, int), np.empty(0)) for _ in gt], 2) == 0.0


@pytest.mark.slow
def test_quick_demo_teachers_map_is_what_its_predictions_score(quick_demo):
    # the report's headline figure, recomputed apart from its script: the teacher's predictions on the quick run's
    # val scans (tools/demo.sh --quick: its data and EVAL_OPTS), scored by centre_distance_map
    work = quick_demo
    numbers = json.loads((work / "report.json").read_text())
    cfg_options = {"test_dataloader.dataset.data_root": f"{work / 'data'}/",
                   "model.test_cfg.pts.pre_max_size": 100, "model.test_cfg.pts.post_max_size": 50}
    gt, pred, classes = predictions_and_gt(REPO / "configs" / "demo" / "teacher_pillar.py", TEACHER, cfg_options)
    assert sum(len(labels) for _, labels in gt) and sum(len(labels) for _, labels, _ in pred)
    recomputed = centre_distance_map(gt, pred, len(classes))
    assert 0.0 < recomputed <= 1.0
    assert numbers["teacher"]["metrics"]["mAP"] == pytest.approx(recomputed, abs=1e-9)
    # every model of the report was evaluated and has a mAP
    assert set(MODELS) <= set(numbers) and all(0.0 <= numbers[name]["metrics"]["mAP"] <= 1.0 for name in MODELS)
    report = (work / "report.md").read_text()
    assert re.search(r"\*\*\d+ s\*\* \(\d+ min \d\d s\)", report), "the run's own wall time is missing"
    stages = [line.split("\t")[0] for line in (work / "timings.tsv").read_text().splitlines()]
    # the trainings run two at a time (either of a pair may finish first), the rest one after the other
    assert stages[:3] == ["generate", "build", "verify"] and stages[-2:] == ["deploy", "report"]
    assert set(stages[3:5]) == {"train_half_kd", "train_half_nokd"}
    assert set(stages[5:7]) == {"train_slim_kd", "train_half_online"}
    for run in ("student_half_kd", "student_half_nokd", "student_slim_kd", "student_half_online"):
        assert "Saving checkpoint" in (work / run / "console.log").read_text(), run


@pytest.mark.slow
def test_quick_demo_report_holds_the_deployment_table_its_run_measured(quick_demo):
    work = quick_demo
    report = (work / "report.md").read_text()
    deployment = json.loads((work / "deployment.json").read_text())
    assert "## Deployment (ONNX Runtime)" in report
    assert set(deployment["models"]) == {"teacher", "half_kd", "slim_kd"}
    for name, model in deployment["models"].items():
        assert set(model["forms"]) == {"pytorch", "fp32", "int8"}
        assert model["raw_max_abs_diff"] < 1e-4, name  # the exported graph computes what the checkpoint does
        for form in model["forms"].values():
            assert all(median > 0 for median, _p90 in form["latency_ms"].values())
    # every ratio of the deployment table is in the demo report, with the value its run measured
    for label, check in deployment["checks"].items():
        assert f"| {label} | {check['speedup']:.2f}x |" in report
    # the students' retention as QUALITY.md measures it: its runs of the demo's recipe, over its teacher
    quality = json.loads((REPO / "quality.json").read_text())
    for student in ("half", "slim"):
        values = [run["mAP"] for run in quality["runs"]
                  if (run["student"], run["recipe"], run["targets"]) == (student, "heatmap=10,reg=1,init", "cache")]
        check = deployment["checks"][f"{student}_kd vs teacher, both ONNX Runtime fp32"]
        if not values:  # QUALITY.md has not trained this student under the demo's recipe (yet): no figure
            assert check["quality_retention"] is None
            continue
        expected = sum(values) / len(values) / quality["teacher"]["mAP"]
        assert check["quality_retention"] == pytest.approx(expected)
        assert f"| {expected:.3f} ({len(values)} seeds) |" in report


@pytest.mark.slow
def test_quick_demo_writes_plots_and_loadable_students(quick_demo):
    work = quick_demo
    for name in ("loss_curves.png", "bev_features.png"):
        image = matplotlib.image.imread(work / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.01, f"{name} is blank"
    from featcache.teacher import models

    for run, config in (("student_half_kd", "configs/demo/student_half.py"),
                        ("student_slim_kd", "configs/demo/student_slim.py")):
        model = models.build_model(models.load_config(REPO / config), work / run / "student.pth")
        assert not any(name.startswith(("terms.", "heads.", "criteria.")) for name in model.state_dict())

