"""Cached response targets under augmentation: the trained demo teacher's cached class heatmaps, moved by
a sample's recorded augmentation (``BevAlignment``, what the ``heatmap`` term does), against the same
teacher run on the augmented scan. The augmentations are mmdet3d's own transforms, so the recorded
metadata is exactly what a student's train pipeline hands the distiller. The same for the cached teacher
boxes as the train pipeline hands them to label KD and the reg term's peaks (``teacher_instances``). And
the regression outputs a build keeps at box centres only: the reg term reads the same targets from them
as from the whole maps, on the student's own augmented samples."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from featcache.teacher import models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.reader import open_cache
from featcache.teacher.recording import record_teacher
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


@pytest.fixture(scope="module")
def regression_caches(tmp_path_factory):
    """The demo teacher's pts_neck, every head output and its boxes on two generated scans, built twice:
    regression outputs at box centres (the default) and at every cell (``--dense-head-outputs``)."""
    root = tmp_path_factory.mktemp("regression")
    subprocess.run([sys.executable, str(REPO / "tools/generate_scenes.py"), "--out", str(root / "scenes"),
                    "--train", "2", "--val", "1", "--seed", "5", "--range", "40"], check=True, capture_output=True)
    options = {"train_dataloader.dataset.data_root": f"{root / 'scenes'}/"}
    for name, dense in (("centres", False), ("dense", True)):
        build_cache(BuildOptions(TEACHER, TEACHER_CKPT, str(root / name), layers="pts_neck", head_outputs="all",
                                 boxes=True, dense_head_outputs=dense, cfg_options=options, num_workers=0,
                                 progress=False))
    return root, options


def _reg_step(cache, options, row: int, seed: int, read: list, monkeypatch) -> dict[str, float]:
    """The reg term's loss per layer (``heatmap=10,reg=1``, QUALITY.md's best recipe) of the demo's half
    student (weights seeded) on one scan after its train pipeline's own random augmentation (seeded);
    ``read`` collects the flat teacher cells the term reads."""
    import random

    from mmdet3d.registry import MODELS
    from mmengine.dataset import pseudo_collate

    from trainer.terms import reg
    from trainer.train import TrainOptions, build_runner_config

    original = reg._one_hot_read
    monkeypatch.setattr(reg, "_one_hot_read", lambda cells, hw: read.append(cells.clone()) or original(cells, hw))
    cfg = build_runner_config(TrainOptions(str(REPO / "configs/demo/student_half.py"), str(cache),
                                           kd={"heatmap": 10.0, "reg": 1.0},
                                           cfg_options={**options, "train_dataloader.num_workers": 0,
                                                        "train_dataloader.persistent_workers": False}))
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    np.random.seed(seed)  # GlobalRotScaleTrans, RandomFlip3D
    random.seed(seed)
    torch.manual_seed(seed)  # PointShuffle (BasePoints.shuffle: torch.randperm)
    sample = dataset[row]
    models.init_mmdet3d_scope()
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    batch = model.data_preprocessor(pseudo_collate([sample]), True)
    with torch.no_grad():
        losses = model.loss(batch["inputs"], batch["data_samples"])
    return {key: float(value) for key, value in losses.items() if key.startswith("loss_kd_reg")}


def test_the_reg_term_reads_the_same_targets_from_regression_outputs_kept_at_box_centres(regression_caches,
                                                                                        monkeypatch):
    root, options = regression_caches
    centres, dense = open_cache(str(root / "centres")), open_cache(str(root / "dense"))
    assert centres.manifest.regression_cells is not None and dense.manifest.regression_cells is None
    for row in range(2):
        for seed in range(3):  # rotations, scales and flips drawn by the student's own pipeline
            read_centres, read_dense = [], []
            losses = _reg_step(root / "centres", options, row, seed, read_centres, monkeypatch)
            # 4 tasks x 5 outputs; a task with no box in the scan has nothing to read (0)
            assert len(losses) == 20 and sum(value > 0 for value in losses.values()) >= 10
            assert losses == _reg_step(root / "dense", options, row, seed, read_dense, monkeypatch)
            cells = torch.cat(read_centres).unique()
            assert torch.equal(cells, torch.cat(read_dense).unique()) and len(cells) >= 10
            # every cell read is one the cache holds the teacher's values at (non-zero), and the cache holds
            # them at few cells
            stored = centres.read_row(row)
            kept = np.zeros(dense.manifest.layers[-1].shape[-2:], dtype=bool)
            for layer in centres.manifest.layers:
                if layer.kind in ("reg", "height", "dim", "rot", "vel"):
                    kept |= (stored[layer.name] != 0).any(axis=0)
            assert kept.ravel()[cells.numpy()].all() and kept.mean() < 0.05


@pytest.mark.parametrize("student", ["student_half.py", "student_coarse.py"])
def test_the_heatmap_term_reads_the_students_logits_though_centerhead_sigmoids_them_in_place(regression_caches,
                                                                                          student, monkeypatch):
    """CenterHead's loss turns its heatmap outputs into scores in place (``clip_sigmoid``: ``sigmoid_``), after
    the distiller's hook recorded them: the term must still get what the head produced. On the half student
    (the teacher's grid) and the coarse one (its own grid: the 50x50 teacher maps resampled onto 40x40)."""
    from mmdet3d.registry import MODELS
    from mmengine.dataset import pseudo_collate

    from trainer.terms.heatmap import HeatmapTerm
    from trainer.train import TrainOptions, build_runner_config

    root, options = regression_caches
    seen, produced = {}, {}
    original = HeatmapTerm.layer_loss
    monkeypatch.setattr(HeatmapTerm, "layer_loss",
                        lambda self, layer: seen.setdefault(layer.key, layer.student.detach().clone())
                        is None or original(self, layer))
    cfg = build_runner_config(TrainOptions(str(REPO / "configs/demo" / student), str(root / "centres"),
                                           kd={"heatmap": {"weight": 1.0, "loss": "focal"}},
                                           cfg_options={**options, "train_dataloader.num_workers": 0,
                                                        "train_dataloader.persistent_workers": False}))
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    models.init_mmdet3d_scope()
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    heads = {f"pts_bbox_head__task_heads__{task}__heatmap": model.student.pts_bbox_head.task_heads[task].heatmap
             for task in range(4)}
    for key, module in heads.items():
        module.register_forward_hook(lambda _m, _i, output, key=key: produced.__setitem__(key, output.detach().clone()))
    batch = model.data_preprocessor(pseudo_collate([dataset[0]]), True)
    losses = model.loss(batch["inputs"], batch["data_samples"])
    assert set(seen) == set(heads)
    for key in heads:
        torch.testing.assert_close(seen[key], produced[key], rtol=0, atol=0)  # logits, as produced
        assert seen[key].min() < 0  # scores would lie in (0, 1)
        grid = 40 if student == "student_coarse.py" else 50
        assert seen[key].shape[-2:] == (grid, grid)
    kd = [value for name, value in losses.items() if name.startswith("loss_kd_heatmap")]
    assert len(kd) == 4 and all(torch.isfinite(value) and value > 0 for value in kd)
    assert all(torch.isfinite(losses[f"task{task}.loss_heatmap"]) for task in range(4))
