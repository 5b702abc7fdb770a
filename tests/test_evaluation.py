"""Center-distance AP against hand-computed nuScenes values, and the mmengine metric interface.

The devkit's AP (calc_ap, min_recall = min_precision = 0.1) keeps the interpolated precision
at recalls 0.11, 0.12, ..., 1.00 (90 points) and returns mean(max(p - 0.1, 0)) / 0.9.
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmdet3d.registry import METRICS
from mmdet3d.structures import Det3DDataSample, LiDARInstance3DBoxes
from mmengine.evaluator import Evaluator
from mmengine.structures import InstanceData

from conftest import REPO
from featcache.deploy.evaluation import latency_stats, score_predictions, val_samples
from trainer.evaluation import CenterDistanceMetric, center_distance_ap

SIZE = (1.9, 4.5, 1.6)  # w, l, h


def gt_box(x: float, y: float, name: str = 'car', z: float = 0.0):
    return ((x, y, z), SIZE, 0.3, name)


def pred_box(x: float, y: float, score: float, name: str = 'car', z: float = 0.0):
    return ((x, y, z), SIZE, 0.3, name, score)


def test_perfect_predictions_give_ap_one_at_every_threshold():
    gt = {'a': [gt_box(0, 0), gt_box(10, 5)], 'b': [gt_box(-7, 3), gt_box(2, 2, 'pedestrian')]}
    pred = {t: [(*box, 0.9 - 0.1 * i) for i, box in enumerate(boxes)] for t, boxes in gt.items()}
    ap = center_distance_ap(gt, pred, ['car', 'pedestrian'])
    assert ap.mean_ap == pytest.approx(1.0)
    for name in ('car', 'pedestrian'):
        assert ap.per_threshold[name] == pytest.approx({0.5: 1.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0})


def test_offset_of_0_7_m_matches_at_1_2_4_but_not_0_5():
    # BEV offset (0.42, 0.56) has length 0.7; the 2 m z offset must not count (distance is xy).
    ap = center_distance_ap({'a': [gt_box(0, 0)]}, {'a': [pred_box(0.42, 0.56, 0.8, z=2.0)]}, ['car'])
    assert ap.per_threshold['car'] == pytest.approx({0.5: 0.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0})
    assert ap.per_class['car'] == pytest.approx(0.75)
    assert ap.mean_ap == pytest.approx(0.75)


def test_false_positive_scored_above_the_true_positive():
    # Sorted: FP then TP -> (recall, precision) points (0, 0) and (1, 0.5); linear interpolation
    # gives p(r) = r / 2. Over r = i/100, i = 11..100: sum(max(i/200 - 0.1, 0)) = sum_{21..100}
    # (i/200 - 0.1) = 4840/200 - 8 = 16.2; AP = 16.2 / 90 / 0.9 = 0.2 (FP 30 m away: every threshold).
    ap = center_distance_ap({'a': [gt_box(0, 0)]}, {'a': [pred_box(0, 0, 0.5), pred_box(30, 0, 0.9)]}, ['car'])
    assert ap.per_threshold['car'] == pytest.approx({0.5: 0.2, 1.0: 0.2, 2.0: 0.2, 4.0: 0.2})
    assert ap.mean_ap == pytest.approx(0.2)


def test_score_ordering_matters():
    # Same boxes, TP scored above the FP: points (1, 1) then (1, 0.5) -> p = 1 for r < 1 and
    # 0.5 at r = 1; AP = (89 * 0.9 + 0.4) / 90 / 0.9 = 80.5 / 81.
    gt = {'a': [gt_box(0, 0)]}
    tp_first = center_distance_ap(gt, {'a': [pred_box(0, 0, 0.9), pred_box(30, 0, 0.5)]}, ['car'])
    fp_first = center_distance_ap(gt, {'a': [pred_box(0, 0, 0.5), pred_box(30, 0, 0.9)]}, ['car'])
    assert tp_first.mean_ap == pytest.approx(80.5 / 81)
    assert fp_first.mean_ap == pytest.approx(0.2)


def test_half_recall_caps_ap():
    # One of two GT found: precision 1 up to recall 0.5, 0 beyond (right=0) -> 40 of the 90
    # points at 0.9 -> AP = 36 / 90 / 0.9 = 4/9.
    gt = {'a': [gt_box(0, 0)], 'b': [gt_box(5, 5)]}
    ap = center_distance_ap(gt, {'a': [pred_box(0, 0, 0.9)]}, ['car'])
    assert ap.mean_ap == pytest.approx(4 / 9)


def test_missing_class_is_zero_and_class_without_gt_is_excluded():
    gt = {'a': [gt_box(0, 0), gt_box(4, 4, 'pedestrian')]}
    pred = {'a': [pred_box(0, 0, 0.9), pred_box(9, 9, 0.8, 'bus')]}  # no pedestrian; bus has no GT
    ap = center_distance_ap(gt, pred, ['car', 'pedestrian', 'bus'])
    assert ap.per_class['car'] == pytest.approx(1.0)
    assert ap.per_class['pedestrian'] == 0.0
    assert math.isnan(ap.per_class['bus'])
    assert ap.mean_ap == pytest.approx(0.5)


def test_predictions_in_samples_without_gt_are_false_positives():
    gt = {'a': [gt_box(0, 0)]}
    ap = center_distance_ap(gt, {'a': [pred_box(0, 0, 0.5)], 'b': [pred_box(0, 0, 0.9)]}, ['car'])
    assert ap.mean_ap == pytest.approx(0.2)  # same curve as the higher-scored FP case


# --- the mmengine metric on real mmdet3d structures ---------------------------------------------

CLASSES = ('car', 'pedestrian', 'bus')


def lidar_boxes(rows: list[list[float]]) -> LiDARInstance3DBoxes:
    """Boxes from (x, y, z_bottom, l, w, h, yaw) rows."""
    return LiDARInstance3DBoxes(torch.tensor(rows, dtype=torch.float32).reshape(-1, 7))


def make_sample(gt_rows, gt_labels, pred_rows, pred_labels, scores) -> Det3DDataSample:
    sample = Det3DDataSample()
    sample.pred_instances_3d = InstanceData(bboxes_3d=lidar_boxes(pred_rows),
                                            scores_3d=torch.tensor(scores, dtype=torch.float32),
                                            labels_3d=torch.tensor(pred_labels, dtype=torch.long))
    sample.eval_ann_info = dict(gt_bboxes_3d=lidar_boxes(gt_rows), gt_labels_3d=np.array(gt_labels, dtype=np.int64))
    return sample


GT_ROWS = [
    [[5.0, 2.0, -1.5, 4.5, 1.9, 1.6, 0.2], [-12.0, 8.0, -1.4, 4.2, 1.8, 1.5, 1.5],
     [3.0, -4.0, -1.6, 0.7, 0.7, 1.8, 0.0], [20.0, 20.0, -1.0, 1.0, 1.0, 1.0, 0.0]],
    [[30.0, -3.0, -1.5, 4.4, 1.9, 1.6, -0.5], [6.0, 6.0, -1.7, 0.6, 0.6, 1.7, 2.0]],
]
GT_LABELS = [[0, 0, 1, -1], [0, 1]]  # -1: a class outside CLASSES, ignored


def run_metric(samples: list[Det3DDataSample], **kwargs) -> dict[str, float]:
    metric = CenterDistanceMetric(**kwargs)
    metric.dataset_meta = dict(classes=CLASSES)
    metric.process({}, samples)
    return metric.compute_metrics(metric.results)


def exact_samples(shift: float = 0.0) -> list[Det3DDataSample]:
    samples = []
    for rows, labels in zip(GT_ROWS, GT_LABELS):
        keep = [i for i, lbl in enumerate(labels) if lbl >= 0]
        pred_rows = [[rows[i][0] + shift, *rows[i][1:]] for i in keep]
        samples.append(make_sample(rows, labels, pred_rows, [labels[i] for i in keep],
                                   [0.9 - 0.1 * k for k in range(len(keep))]))
    return samples


def test_metric_is_one_for_predictions_equal_to_gt_through_the_evaluator():
    evaluator = Evaluator(METRICS.build(dict(type='CenterDistanceMetric')))
    evaluator.dataset_meta = dict(classes=CLASSES)
    evaluator.process(exact_samples())  # the ValLoop's call: Det3DDataSamples, turned into dicts
    metrics = evaluator.evaluate(2)
    assert metrics['center_dist/mAP'] == pytest.approx(1.0)
    assert metrics['center_dist/AP_car'] == pytest.approx(1.0)
    assert metrics['center_dist/AP_pedestrian'] == pytest.approx(1.0)
    assert math.isnan(metrics['center_dist/AP_bus'])


def test_metric_drops_for_perturbed_predictions():
    assert run_metric(exact_samples(shift=0.7))['mAP'] == pytest.approx(0.75)
    assert run_metric(exact_samples(shift=5.0))['mAP'] == 0.0


def with_extra_car(sample: Det3DDataSample, score: float) -> Det3DDataSample:
    """The sample with one more predicted car, 40 m from every GT (a false positive)."""
    pred = sample.pred_instances_3d
    rows = torch.cat([pred.bboxes_3d.tensor, torch.tensor([[-40.0, 0.0, -1.5, 4.0, 1.8, 1.5, 0.0]])])
    gt = sample.eval_ann_info
    return make_sample(gt['gt_bboxes_3d'].tensor.tolist(), gt['gt_labels_3d'].tolist(), rows.tolist(),
                       [*pred.labels_3d.tolist(), 0], [*pred.scores_3d.tolist(), score])


def test_metric_score_threshold_drops_low_scored_false_positives():
    samples = exact_samples()
    samples[1] = with_extra_car(samples[1], score=0.95)
    assert run_metric(samples)['AP_car'] < 1.0
    samples[1] = with_extra_car(exact_samples()[1], score=0.05)
    assert run_metric(samples)['AP_car'] < 1.0
    assert run_metric(samples, score_threshold=0.1)['mAP'] == pytest.approx(1.0)


def test_metric_max_boxes_keeps_the_top_scored():
    # One box per sample: the 0.9-scored car of each sample survives, 2 of 3 car GT, no pedestrian.
    limited = run_metric(exact_samples(), max_boxes_per_sample=1)
    assert 0.0 < limited['AP_car'] < 1.0
    assert limited['AP_pedestrian'] == 0.0


def test_metric_max_range_drops_far_gt_and_predictions():
    samples = exact_samples()
    # Remove the prediction of the 30 m car: missed unless max_range excludes that GT.
    row, label = GT_ROWS[1][1], GT_LABELS[1][1]
    samples[1] = make_sample(GT_ROWS[1], GT_LABELS[1], [row], [label], [0.9])
    assert run_metric(samples)['AP_car'] < 1.0
    assert run_metric(samples, max_range=25.0)['mAP'] == pytest.approx(1.0)


def test_metric_requires_eval_ann_info():
    sample = exact_samples()[0]
    del sample.eval_ann_info
    with pytest.raises(ValueError, match='eval_ann_info'):
        run_metric([sample])


def test_deployed_predictions_are_scored_with_the_configs_evaluator_on_its_gt(tmp_path):
    """featcache.deploy.evaluation (deploy_report's mAP column): predictions stored as deploy_report's workers
    store them (.npz of boxes, scores, labels, per-scan counts) are scored against the config's test split; the
    GT boxes themselves score a perfect mAP, and the same boxes moved 3 m off score less."""
    subprocess.run([sys.executable, "tools/generate_scenes.py", "--out", str(tmp_path / "scenes"), "--train", "1",
                    "--val", "2", "--seed", "0", "--range", "40"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    cfg, paths, samples = val_samples(str(REPO / "configs/demo/teacher_pillar.py"),
                                      {"test_dataloader.dataset.data_root": f"{tmp_path / 'scenes'}/"}, None)
    assert len(paths) == len(samples) == 2
    boxes = [sample.eval_ann_info["gt_bboxes_3d"].tensor.numpy() for sample in samples]
    labels = [np.asarray(sample.eval_ann_info["gt_labels_3d"]) for sample in samples]

    def score(shift: float) -> float:
        moved = [np.concatenate([b[:, :1] + shift, b[:, 1:]], axis=1) for b in boxes]
        path = tmp_path / f"predictions_{shift}.npz"
        np.savez(path, boxes=np.concatenate(moved), scores=np.ones(sum(map(len, boxes)), np.float32),
                 labels=np.concatenate(labels), counts=np.asarray([len(b) for b in boxes]))
        return score_predictions(cfg, samples, str(path))["mAP"]

    assert score(0.0) == pytest.approx(1.0)
    assert score(3.0) < 1.0
    median, p90 = latency_stats([0.010, 0.020, 0.030])
    assert median == pytest.approx(20.0) and p90 == pytest.approx(28.0)
    assert all(math.isnan(value) for value in latency_stats([]))
