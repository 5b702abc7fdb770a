"""Cached response targets under augmentation: the trained demo teacher's cached class heatmaps, moved by
a sample's recorded augmentation (``BevAlignment``, what the ``heatmap`` term does), against the same
teacher run on the augmented scan. The augmentations are mmdet3d's own transforms, so the recorded
metadata is exactly what a student's train pipeline hands the distiller. The same for the cached teacher
boxes as the train pipeline hands them to label KD and the reg term's peaks (``teacher_instances``)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from featcache import models
from featcache.build import BuildOptions, build_cache
from featcache.reader import open_cache
from featcache.recording import record_teacher
from lidar_fixtures import REPO
from trainer.bev_warp import BevAlignment

TEACHER = str(REPO / "configs/demo/teacher_pillar.py")
TEACHER_CKPT = str(REPO / "checkpoints/demo_teacher_pillar.pth")


@pytest.fixture(scope="module")
def heatmap_cache(tmp_path_factory):
    """Two generated demo scans (the demo's generator, seeded) and their cache of pts_neck + heatmaps + boxes."""
    root = tmp_path_factory.mktemp("response")
    subprocess.run([sys.executable, str(REPO / "tools/generate_scenes.py"), "--out", str(root / "scenes"),
                    "--train", "2", "--val", "1", "--seed", "11", "--range", "40"], check=True, capture_output=True)
    options = {"train_dataloader.dataset.data_root": f"{root / 'scenes'}/"}
    build_cache(BuildOptions(TEACHER, TEACHER_CKPT, str(root / "cache"), layers="pts_neck", head_outputs="heatmap",
                             boxes=True, cfg_options=options, num_workers=0, progress=False))
    return root / "cache", options


def _augment(points, kind: str) -> tuple[object, dict]:
    from mmdet3d.datasets.transforms import GlobalRotScaleTrans, RandomFlip3D

    steps = {"flip": [RandomFlip3D(sync_2d=False, flip_ratio_bev_horizontal=1.0)],
             "rotate+scale": [GlobalRotScaleTrans(rot_range=[0.3, 0.3], scale_ratio_range=[1.03, 1.03],
                                                  translation_std=[0, 0, 0])],
             "rotate+scale+flip": [GlobalRotScaleTrans(rot_range=[-0.3, -0.3], scale_ratio_range=[0.97, 0.97],
                                                       translation_std=[0, 0, 0]),
                                   RandomFlip3D(sync_2d=False, flip_ratio_bev_vertical=1.0)]}[kind]
    results = {"points": points.clone()}
    for step in steps:
        results = step(results)
    return results.pop("points"), results


@pytest.mark.parametrize("kind", ["flip", "rotate+scale", "rotate+scale+flip"])
def test_cached_heatmaps_moved_by_the_recorded_augmentation_match_the_teacher_on_the_augmented_scan(heatmap_cache,
                                                                                                  kind):
    from mmdet3d.structures import LiDARPoints
    from mmengine.dataset import pseudo_collate

    path, options = heatmap_cache
    cache = open_cache(str(path))
    layers = [layer.name for layer in cache.manifest.layers if layer.is_head_output]
    assert len(layers) == 4  # the demo teacher's four tasks
    cfg = models.load_config(TEACHER, options)
    teacher = models.build_model(cfg, TEACHER_CKPT).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    pcr = cfg.point_cloud_range
    bev = [pcr[0], pcr[1], pcr[3], pcr[4]]
    for index in range(len(dataset)):
        item = dataset[index]  # the teacher's test pipeline, as the build ran it
        row = cache.read(cache.row_keys[index])
        points = LiDARPoints(item["inputs"]["points"], points_dim=item["inputs"]["points"].shape[1])
        augmented, meta = _augment(points, kind)
        live = record_teacher(teacher, pseudo_collate([{"inputs": {"points": augmented.tensor},
                                                        "data_samples": item["data_samples"]}]), layers)
        warped_r, plain_r = [], []
        for layer in layers:
            cached = torch.from_numpy(np.asarray(row[layer])).float()
            alignment = BevAlignment(bev, tuple(cached.shape[-2:]), bev, tuple(cached.shape[-2:]), meta)
            valid = alignment.valid.reshape(cached.shape[-2:])
            target = torch.sigmoid(live[layer][0].float())[:, valid].flatten().numpy()
            warped = torch.sigmoid(alignment.warp(cached))[:, valid].flatten().numpy()
            plain = torch.sigmoid(cached)[:, valid].flatten().numpy()
            warped_r.append(np.corrcoef(target, warped)[0, 1])
            plain_r.append(np.corrcoef(target, plain)[0, 1])
        # a trained pillar network is only approximately equivariant (pillar grid, interpolation): the moved
        # targets agree with the live teacher closely, the unmoved ones barely
        assert np.mean(warped_r) > 0.8, (kind, index, warped_r)
        assert all(w > p + 0.2 for w, p in zip(warped_r, plain_r)), (kind, index, warped_r, plain_r)


@pytest.mark.parametrize("kind", ["flip", "rotate+scale+flip"])
def test_cached_boxes_moved_by_the_recorded_augmentation_are_the_teachers_boxes_on_the_augmented_scan(heatmap_cache,
                                                                                                    kind):
    from mmdet3d.structures import LiDARPoints
    from mmengine.dataset import pseudo_collate

    from trainer.transforms import teacher_instances

    path, options = heatmap_cache
    cache = open_cache(str(path))
    cfg = models.load_config(TEACHER, options)
    teacher = models.build_model(cfg, TEACHER_CKPT).eval()
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    classes = list(dataset.metainfo["classes"])
    for index in range(len(dataset)):
        item = dataset[index]
        stored = cache.read_boxes(index)
        points = LiDARPoints(item["inputs"]["points"], points_dim=item["inputs"]["points"].shape[1])
        augmented, meta = _augment(points, kind)
        with torch.no_grad():
            (live,) = teacher.test_step(pseudo_collate([{"inputs": {"points": augmented.tensor},
                                                         "data_samples": item["data_samples"]}]))
        live = live.pred_instances_3d
        confident = live.scores_3d >= 0.5
        live_xy, live_labels = live.bboxes_3d.tensor[confident, :2], live.labels_3d[confident]
        moved = teacher_instances(stored, cache.manifest.boxes.classes, classes, meta, cfg.point_cloud_range)
        unmoved = teacher_instances(stored, cache.manifest.boxes.classes, classes, {}, cfg.point_cloud_range)

        def found(instances) -> float:
            """Share of the confident cached boxes with a live box of the same class within 1 m."""
            keep = instances.scores_3d >= 0.5
            xy, labels = instances.bboxes_3d.tensor[keep, :2], instances.labels_3d[keep]
            distance = torch.cdist(xy, live_xy, compute_mode="donot_use_mm_for_euclid_dist")
            distance[labels[:, None] != live_labels[None, :]] = float("inf")
            return float((distance.min(dim=1).values <= 1.0).float().mean())

        assert int((moved.scores_3d >= 0.5).sum()) >= 5  # a trained teacher: boxes to compare
        # the teacher is only approximately equivariant: nearly every moved box is one it finds on the augmented
        # scan, while the boxes left where the un-augmented scan had them mostly are not
        assert found(moved) >= 0.8, (kind, index, found(moved))
        assert found(moved) > found(unmoved) + 0.4, (kind, index, found(moved), found(unmoved))
