"""nuScenes-style center-distance AP / mAP for BEV 3D detectors, without the nuScenes database.

The official nuScenes evaluation needs the full nuScenes tables (sample, ego pose, ...); our
generated scenes only have mmdet3d v2 infos. The matching and AP computation need none of that,
so this module feeds in-memory boxes to nuscenes-devkit's own `accumulate` and `calc_ap` (they
run unchanged under numpy 2): greedy matching by descending score on BEV center distance,
precision interpolated at 101 recall points, min_recall = min_precision = 0.1.

Not reproduced from the official protocol: per-class evaluation ranges and the bike-rack filter
(an optional single max BEV range is offered instead), and the TP error metrics / NDS.

Use in an mmdet3d config (the val dataset needs test_mode=True and annotations so that
`eval_ann_info` reaches the metric)::

    custom_imports = dict(imports=['trainer.evaluation'], allow_failed_imports=False)
    val_evaluator = dict(type='CenterDistanceMetric', max_range=50.0)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from mmdet3d.registry import METRICS
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.structures import BaseDataElement
from nuscenes.eval.common.data_classes import EvalBoxes
from nuscenes.eval.common.utils import center_distance
from nuscenes.eval.detection.algo import accumulate, calc_ap
from nuscenes.eval.detection.data_classes import DetectionBox

DIST_THS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
MIN_RECALL = 0.1
MIN_PRECISION = 0.1

# DetectionBox only accepts the ten nuScenes class names. Each class is evaluated on its own
# EvalBoxes holding only that class's boxes, all under this stand-in name, so any class name
# works and the result is identical (accumulate never matches across classes).
_DEVKIT_NAME = 'car'

Vec3 = Sequence[float]
GtBox = tuple[Vec3, Vec3, float, str]
"""(center xyz, size wlh, yaw, class name). Only the xy center affects AP."""
PredBox = tuple[Vec3, Vec3, float, str, float]
"""GtBox plus the detection score."""


@dataclass(frozen=True)
class CenterDistanceAP:
    """AP per class (mean over distance thresholds), per class and threshold, and their mAP.

    Classes without GT have no defined AP: they are NaN here and excluded from `mean_ap`
    (NaN too if no class has GT). Classes with GT but no predictions have AP 0.
    """

    mean_ap: float
    per_class: dict[str, float]
    per_threshold: dict[str, dict[float, float]]


def _devkit_box(token: str, center: Vec3, size: Vec3, yaw: float, score: float = -1.0) -> DetectionBox:
    # The yaw quaternion (w, x, y, z) about +z and the positive size only serve the devkit's
    # TP-error side metrics (yaw_diff, scale_iou asserts size > 0); AP does not use them.
    return DetectionBox(sample_token=token,
                        translation=tuple(float(v) for v in center),
                        size=tuple(max(float(v), 1e-3) for v in size),
                        rotation=(math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)),
                        detection_name=_DEVKIT_NAME,
                        detection_score=float(score))


def center_distance_ap(gt: Mapping[str, Sequence[GtBox]],
                       pred: Mapping[str, Sequence[PredBox]],
                       class_names: Sequence[str],
                       dist_ths: Sequence[float] = DIST_THS) -> CenterDistanceAP:
    """Compute nuScenes center-distance AP per class and mAP from boxes keyed by sample token.

    Predictions of samples absent from `gt` cannot match anything and count as false
    positives, as in the devkit. Boxes of classes not in `class_names` are ignored.
    """
    per_threshold: dict[str, dict[float, float]] = {}
    for name in class_names:
        gt_boxes, pred_boxes = EvalBoxes(), EvalBoxes()
        # Insertion order, not a set: accumulate breaks score ties by list position.
        for token in dict.fromkeys([*gt, *pred]):
            gt_boxes.add_boxes(token, [_devkit_box(token, c, s, y)
                                       for c, s, y, cls in gt.get(token, ()) if cls == name])
            pred_boxes.add_boxes(token, [_devkit_box(token, c, s, y, score)
                                         for c, s, y, cls, score in pred.get(token, ()) if cls == name])
        if not gt_boxes.all:
            per_threshold[name] = {float(th): math.nan for th in dist_ths}
            continue
        per_threshold[name] = {
            float(th): calc_ap(accumulate(gt_boxes, pred_boxes, _DEVKIT_NAME, center_distance, th),
                               MIN_RECALL, MIN_PRECISION)
            for th in dist_ths}
    per_class = {name: float(np.mean(list(aps.values()))) for name, aps in per_threshold.items()}
    defined = [ap for ap in per_class.values() if not math.isnan(ap)]
    mean_ap = float(np.mean(defined)) if defined else math.nan
    return CenterDistanceAP(mean_ap=mean_ap, per_class=per_class, per_threshold=per_threshold)


def _box_arrays(boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gravity centers, wlh sizes and yaws of mmdet3d LiDAR boxes as numpy arrays."""
    centers = boxes.gravity_center.detach().cpu().numpy()
    # mmdet3d LiDAR dims are (l, w, h) along (x, y, z); nuScenes sizes are (w, l, h).
    sizes = boxes.dims.detach().cpu().numpy()[:, [1, 0, 2]]
    yaws = boxes.yaw.detach().cpu().numpy()
    return centers, sizes, yaws


def _to_numpy(values) -> np.ndarray:
    return values.detach().cpu().numpy() if hasattr(values, 'detach') else np.asarray(values)


@METRICS.register_module()
class CenterDistanceMetric(BaseMetric):
    """mmengine metric giving nuScenes center-distance mAP and AP_<class> from a val loop.

    Predictions come from each sample's `pred_instances_3d` (`bboxes_3d`, `scores_3d`,
    `labels_3d`), GT from `eval_ann_info` (`gt_bboxes_3d`, `gt_labels_3d`, label -1 = ignored
    class), both in the sample's LiDAR frame: no ann_file or nuScenes tables are read.

    Args:
        classes: names of the label indices; defaults to `dataset_meta['classes']`.
        score_threshold: predictions scoring below it are dropped.
        max_boxes_per_sample: only the highest-scoring ones are kept (nuScenes allows 500).
        dist_ths: center-distance match thresholds in meters.
        max_range: if set, GT and predictions at a BEV distance >= max_range from the LiDAR
            origin are dropped (one range for all classes, unlike nuScenes' per-class ranges).
    """

    default_prefix = 'center_dist'

    def __init__(self,
                 classes: Sequence[str] | None = None,
                 score_threshold: float = 0.0,
                 max_boxes_per_sample: int = 500,
                 dist_ths: Sequence[float] = DIST_THS,
                 max_range: float | None = None,
                 collect_device: str = 'cpu',
                 prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.classes = tuple(classes) if classes is not None else None
        self.score_threshold = score_threshold
        self.max_boxes_per_sample = max_boxes_per_sample
        self.dist_ths = tuple(dist_ths)
        self.max_range = max_range

    def _in_range(self, centers: np.ndarray) -> np.ndarray:
        if self.max_range is None:
            return np.ones(len(centers), dtype=bool)
        return np.hypot(centers[:, 0], centers[:, 1]) < self.max_range

    def process(self, data_batch, data_samples: Sequence[dict | BaseDataElement]) -> None:
        """Store each sample's filtered GT and predictions as numpy arrays (cheap to collect)."""
        for sample in data_samples:
            if isinstance(sample, BaseDataElement):
                sample = sample.to_dict()
            ann = sample.get('eval_ann_info')
            if ann is None:
                raise ValueError('CenterDistanceMetric needs eval_ann_info: build the val dataset with '
                                 'test_mode=True, load_eval_anns=True and annotated infos')
            gt_centers, gt_sizes, gt_yaws = _box_arrays(ann['gt_bboxes_3d'])
            gt_labels = _to_numpy(ann['gt_labels_3d']).astype(np.int64)
            keep = (gt_labels >= 0) & self._in_range(gt_centers)

            pred = sample['pred_instances_3d']
            centers, sizes, yaws = _box_arrays(pred['bboxes_3d'])
            scores = _to_numpy(pred['scores_3d']).astype(np.float64)
            labels = _to_numpy(pred['labels_3d']).astype(np.int64)
            kept = np.flatnonzero((scores >= self.score_threshold) & self._in_range(centers))
            kept = kept[np.argsort(-scores[kept], kind='stable')[:self.max_boxes_per_sample]]

            self.results.append(dict(
                gt=(gt_centers[keep], gt_sizes[keep], gt_yaws[keep], gt_labels[keep]),
                pred=(centers[kept], sizes[kept], yaws[kept], labels[kept], scores[kept])))

    def compute_metrics(self, results: list[dict]) -> dict[str, float]:
        """Return {'mAP': ..., 'AP_<class>': ...}; AP of a class without GT is NaN."""
        names = self.classes if self.classes is not None else tuple(self.dataset_meta['classes'])

        gt: dict[str, list[GtBox]] = {}
        pred: dict[str, list[PredBox]] = {}
        # Each result holds a whole sample, so its position is a unique sample token.
        for i, result in enumerate(results):
            token = str(i)
            gt[token] = [(c, s, float(y), names[lbl]) for c, s, y, lbl in zip(*result['gt'])
                         if lbl < len(names)]
            pred[token] = [(c, s, float(y), names[lbl], float(sc)) for c, s, y, lbl, sc in zip(*result['pred'])
                           if 0 <= lbl < len(names)]
        ap = center_distance_ap(gt, pred, names, self.dist_ths)
        return {'mAP': ap.mean_ap, **{f'AP_{name}': value for name, value in ap.per_class.items()}}


@dataclass
class Evaluation:
    """Detection quality and CPU latency of one model on one split."""

    metrics: dict[str, float]  # 'mAP', 'AP_<class>' as from CenterDistanceMetric
    latency_ms: float  # median per-sample predict time (voxelisation, network, decoding, NMS)
    num_samples: int
    num_parameters: int


def evaluate_checkpoint(config: str, checkpoint: str, cfg_options: dict | None = None, split: str = 'test',
                        warmup: int = 2) -> Evaluation:
    """Run ``config``'s model with ``checkpoint`` over ``split``'s dataloader dataset one sample at a
    time, scoring it with the config's ``{split}_evaluator`` (e.g. CenterDistanceMetric, falling back
    to ``val_evaluator``) and timing each predict call.

    Batch size 1 and the loading pipeline outside the timer make the latency what a single-frame
    deployment on this CPU would see; the first ``warmup`` samples are scored but not timed.
    """
    import time

    import torch
    from mmengine.dataset import pseudo_collate

    from featcache.teacher import models

    cfg = models.load_config(config, cfg_options)
    evaluator_cfg = cfg.get(f'{split}_evaluator') or cfg.get('val_evaluator')
    if not evaluator_cfg:
        raise ValueError(f'config {config!r} has no {split}_evaluator (or val_evaluator) to score {split!r} with')
    model = models.build_model(cfg, checkpoint).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, split))
    evaluator = Evaluator(METRICS.build(evaluator_cfg))
    evaluator.dataset_meta = dataset.metainfo
    times = []
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = pseudo_collate([dataset[index]])
            start = time.perf_counter()
            data = model.data_preprocessor(batch, False)
            predictions = model(**data, mode='predict')
            if index >= warmup:
                times.append(time.perf_counter() - start)
            evaluator.process(predictions, batch)
    metrics = evaluator.evaluate(len(dataset))
    metrics = {key.split('/')[-1]: float(value) for key, value in metrics.items()}
    return Evaluation(metrics=metrics, latency_ms=1000 * float(np.median(times)) if times else math.nan,
                      num_samples=len(dataset), num_parameters=sum(p.numel() for p in model.parameters()))
