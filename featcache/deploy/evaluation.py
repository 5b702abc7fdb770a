"""How a deployed detector is measured against its PyTorch source: one form run over scans in a fresh process
(latency, peak memory, predictions), those predictions scored with the config's own test evaluator on the same
GT, and the raw head outputs compared. ``tools/deploy_report.py`` interleaves the runs and writes the report."""
from __future__ import annotations

import math
import sys
import time

import numpy as np

from featcache.benchmarks.machine import peak_rss_mb


def run_form(job: dict) -> dict:
    """Run one form (``job['form']``: "pytorch", "fp32" or "int8") over ``job['scans']`` in this (fresh) process,
    the first ``job['warmup']`` not timed; predictions to ``job['out']`` (.npz). Returns the times, the peak
    resident memory and which heavy modules the process loaded (an ONNX Runtime form must load none)."""
    threads, scans, warmup = int(job["threads"]), job["scans"], int(job["warmup"])
    times, boxes, scores, labels = [], [], [], []
    if job["form"] == "pytorch":
        import torch
        from mmdet3d.structures import LiDARInstance3DBoxes
        from mmengine.dataset import Compose, pseudo_collate

        from featcache.deploy.export import load_detector

        torch.set_num_threads(threads)
        cfg, model = load_detector(job["config"], job["checkpoint"], job["cfg_options"])
        pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
        with torch.no_grad():
            for index, scan in enumerate(scans):
                batch = pseudo_collate([pipeline(dict(lidar_points=dict(lidar_path=scan),
                                                      box_type_3d=LiDARInstance3DBoxes, box_mode_3d=None))])
                start = time.perf_counter()
                pred = model(**model.data_preprocessor(batch, False), mode="predict")[0].pred_instances_3d
                if index >= warmup:
                    times.append(time.perf_counter() - start)
                boxes.append(pred.bboxes_3d.tensor.numpy())
                scores.append(pred.scores_3d.numpy())
                labels.append(pred.labels_3d.numpy())
    else:
        from featcache.deploy.runtime import DeployedDetector
        from featcache.deploy.voxelize import read_scan

        detector = DeployedDetector.open(job["export_dir"], threads=threads, variant=job["form"])
        detector.check_source(job["checkpoint"])  # the export measured is the checkpoint's
        for index, scan in enumerate(scans):
            points = read_scan(scan, detector.spec.points)
            start = time.perf_counter()
            detections = detector.predict(points)
            if index >= warmup:
                times.append(time.perf_counter() - start)
            boxes.append(detections.boxes)
            scores.append(detections.scores)
            labels.append(detections.labels)
    counts = np.asarray([len(s) for s in scores])
    np.savez(job["out"], boxes=np.concatenate(boxes), scores=np.concatenate(scores),
             labels=np.concatenate(labels), counts=counts)
    loaded = sorted(name for name in ("torch", "mmdet3d", "mmcv") if name in sys.modules)
    return {"times_s": times, "peak_rss_mb": peak_rss_mb(), "heavy_modules_loaded": loaded}


def val_samples(config: str, cfg_options: dict, limit: int | None):
    """(lidar paths, data samples carrying eval_ann_info) of the config's test split, first ``limit``."""
    from featcache.teacher import models

    cfg = models.load_config(config, cfg_options)
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "test"))
    count = len(dataset) if limit is None else min(limit, len(dataset))
    paths, samples = [], []
    for index in range(count):
        info = dataset.get_data_info(index)
        paths.append(info["lidar_points"]["lidar_path"])
        samples.append(dataset[index]["data_samples"])
    return cfg, paths, samples


def score_predictions(cfg, samples, predictions_npz: str) -> dict[str, float]:
    """The config's test evaluator (CenterDistanceMetric) on stored predictions."""
    import torch
    from mmdet3d.registry import METRICS
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.evaluator import Evaluator
    from mmengine.structures import InstanceData

    stored = np.load(predictions_npz)
    evaluator = Evaluator(METRICS.build(cfg.test_evaluator))
    evaluator.dataset_meta = {"classes": tuple(cfg.class_names) if "class_names" in cfg else None}
    if evaluator.dataset_meta["classes"] is None:
        evaluator.dataset_meta = {"classes": tuple(cfg.test_dataloader.dataset.metainfo["classes"])}
    offsets = np.concatenate([[0], np.cumsum(stored["counts"])])
    for index, sample in enumerate(samples):
        part = slice(offsets[index], offsets[index + 1])
        sample = sample.clone()
        sample.pred_instances_3d = InstanceData(
            bboxes_3d=LiDARInstance3DBoxes(torch.from_numpy(stored["boxes"][part]), box_dim=stored["boxes"].shape[1]),
            scores_3d=torch.from_numpy(stored["scores"][part]), labels_3d=torch.from_numpy(stored["labels"][part]))
        evaluator.process([sample], None)
    metrics = evaluator.evaluate(len(samples))
    return {key.split("/")[-1]: float(value) for key, value in metrics.items()}


def raw_output_difference(config: str, checkpoint: str, export_dir: str, scans: list[str], cfg_options: dict) -> float:
    """Largest |ONNX Runtime - PyTorch| over every dense head output of every scan (fp32)."""
    from featcache.deploy.export import load_detector, network_outputs
    from featcache.deploy.runtime import DeployedDetector

    _, model = load_detector(config, checkpoint, cfg_options)
    detector = DeployedDetector.open(export_dir)
    worst = 0.0
    for scan in scans:
        voxels = detector.voxelize(scan)
        ours = detector.raw_outputs(voxels)
        theirs = network_outputs(model, voxels.voxels, voxels.num_points, voxels.coors)
        worst = max(worst, max(float(np.abs(ours[name] - theirs[name]).max()) for name in theirs))
    return worst


def latency_stats(times: list[float]) -> tuple[float, float]:
    """(median, p90) of ``times`` (s) in ms; NaN for none."""
    if not times:
        return math.nan, math.nan
    values = 1000.0 * np.asarray(times)
    return float(np.median(values)), float(np.percentile(values, 90))
