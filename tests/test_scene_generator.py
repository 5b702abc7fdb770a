"""The synthetic scene generator (featcache.scenes, tools/generate_scenes.py): determinism, the on-disk format as
mmdet3d's real NuScenesDataset reads it, and the physics of the ray-cast sensor."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.scenes import (CLASSES, INSET, NUS_CLASSES, SENSOR_HEIGHT, STAMP_NAME, Scene, generate_dataset,
                              generate_scene, render, scene_rng)

SEED, NUM_TRAIN, NUM_VAL = 7, 3, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    assert generate_dataset(root, NUM_TRAIN, NUM_VAL, SEED)["generated"]
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _infos(root: Path, split: str) -> dict:
    with open(root / f"nuscenes_infos_{split}.pkl", "rb") as handle:
        return pickle.load(handle)


def _on_ground(x: float, y: float, name: str, yaw: float = 0.0) -> list[float]:
    """A box of class ``name`` at its mean size standing on the default flat ground."""
    length, width, height = CLASSES[name][0]
    return [x, y, -SENSOR_HEIGHT + 0.02 + height / 2, length, width, height, yaw]


def _scene(*boxes: tuple[list[float], str]) -> Scene:
    return Scene(np.array([box for box, _ in boxes]).reshape(-1, 7),
                 np.array([NUS_CLASSES.index(name) for _, name in boxes], dtype=np.int64))


def _box_frame(xyz: np.ndarray, box: np.ndarray) -> np.ndarray:
    c, s = np.cos(box[6]), np.sin(box[6])
    dx, dy = xyz[:, 0] - box[0], xyz[:, 1] - box[1]
    return np.column_stack([c * dx + s * dy, -s * dx + c * dy, xyz[:, 2] - box[2]])


def test_same_seed_same_bytes_other_seed_differs_and_reruns_are_noops(dataset, tmp_path, capsys):
    twin = tmp_path / "twin"
    generate_dataset(twin, NUM_TRAIN, NUM_VAL, SEED)
    assert _files(twin) == _files(dataset)

    other = tmp_path / "other"
    generate_dataset(other, NUM_TRAIN, NUM_VAL, SEED + 1)
    before, reseeded = _files(dataset), _files(other)
    scans = [name for name in before if name.endswith(".bin")]
    assert len(scans) == NUM_TRAIN + NUM_VAL
    assert all(reseeded[name] != before[name] for name in scans)

    assert not generate_dataset(dataset, NUM_TRAIN, NUM_VAL, SEED)["generated"]
    assert "nothing to do" in capsys.readouterr().out
    assert _files(dataset) == before
    assert (dataset / STAMP_NAME).is_file()

    train, val = (_infos(dataset, split)["data_list"] for split in ("train", "val"))
    assert {info["token"] for info in train}.isdisjoint(info["token"] for info in val)
    assert {info["lidar_points"]["lidar_path"] for info in train}.isdisjoint(
        info["lidar_points"]["lidar_path"] for info in val)


def test_changed_parameters_regenerate(dataset, tmp_path):
    root = tmp_path / "grow"
    generate_dataset(root, 1, 1, SEED)
    summary = generate_dataset(root, 2, 1, SEED)
    assert summary["generated"] and len(_infos(root, "train")["data_list"]) == 2
    # per-sample streams: the first scans do not depend on how many are generated
    assert (root / "samples/LIDAR_TOP/synth_train_000000__LIDAR_TOP.pcd.bin").read_bytes() == \
        (dataset / "samples/LIDAR_TOP/synth_train_000000__LIDAR_TOP.pcd.bin").read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_loads_through_mmdet3d_nuscenes_dataset(dataset, split):
    from mmcv.ops import points_in_boxes_cpu
    from mmdet3d.registry import DATASETS
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    nus = DATASETS.build(dict(
        type="NuScenesDataset", data_root=str(dataset), ann_file=f"nuscenes_infos_{split}.pkl",
        data_prefix=dict(pts="samples/LIDAR_TOP", img="", sweeps="sweeps/LIDAR_TOP"),
        metainfo=dict(classes=list(NUS_CLASSES)), modality=dict(use_lidar=True, use_camera=False),
        pipeline=[dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
                  dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
                  dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"])],
        test_mode=False, box_type_3d="LiDAR"))
    infos = _infos(dataset, split)["data_list"]
    assert len(nus) == len(infos)
    for index, info in enumerate(infos):
        item = nus[index]
        sample = item["data_samples"]
        assert Path(sample.lidar_path).name == info["lidar_points"]["lidar_path"]
        points, boxes, labels = generate_scene(scene_rng(SEED, split, index))
        assert torch.equal(item["inputs"]["points"], torch.from_numpy(points))

        gt = sample.gt_instances_3d
        assert gt.labels_3d.tolist() == labels.tolist()
        loaded = gt.bboxes_3d
        np.testing.assert_allclose(loaded.gravity_center.numpy(), boxes[:, :3], atol=1e-4)
        np.testing.assert_allclose(loaded.dims.numpy(), boxes[:, 3:6], atol=1e-5)
        np.testing.assert_allclose(loaded.yaw.numpy(), boxes[:, 6], atol=1e-5)
        assert loaded.tensor.shape[1] == 9 and not loaded.tensor[:, 7:].any()  # zero velocity

        inside = points_in_boxes_cpu(torch.from_numpy(points[None, :, :3]), loaded.tensor[None, :, :7])[0]
        num_lidar_pts = [instance["num_lidar_pts"] for instance in info["instances"]]
        assert inside.sum(0).tolist() == num_lidar_pts
        assert min(num_lidar_pts) >= 1
        assert inside.sum(1).max() <= 1  # boxes do not overlap


def test_realistic_scans_and_at_least_three_classes(dataset):
    present: set[str] = set()
    for split in ("train", "val"):
        for info in _infos(dataset, split)["data_list"]:
            scan = np.fromfile(dataset / "samples/LIDAR_TOP" / info["lidar_points"]["lidar_path"], np.float32)
            scan = scan.reshape(-1, 5)
            assert 20_000 <= len(scan) <= 40_000
            assert scan[:, 3].min() >= 0 and scan[:, 3].max() <= 255
            assert set(np.unique(scan[:, 4]).astype(int)) == set(range(32))
            for instance in info["instances"]:
                name = NUS_CLASSES[instance["bbox_label_3d"]]
                present.add(name)
                assert np.allclose(instance["bbox_3d"][3:6], CLASSES[name][0], rtol=0.3)
    assert len(present) >= 3 and "car" in present


def test_one_scan_is_fast():
    start = time.perf_counter()
    generate_scene(np.random.default_rng(0))
    assert time.perf_counter() - start < 2.0


def test_ground_density_falls_with_range():
    points, _ = render(_scene(), np.random.default_rng(0))
    radius = np.hypot(points[:, 0], points[:, 1])
    near = ((radius >= 5) & (radius < 10)).sum() / (np.pi * (10**2 - 5**2))
    far = ((radius >= 30) & (radius < 40)).sum() / (np.pi * (40**2 - 30**2))
    assert near > 10 * far > 0
    assert np.allclose(points[:, 2], -SENSOR_HEIGHT, atol=0.03)  # flat ground, only noise


def test_box_behind_another_is_occluded():
    behind = (_on_ground(24.0, 0.0, "car"), "car")
    _, owner_alone = render(_scene(behind), np.random.default_rng(0))
    _, owner_hidden = render(_scene((_on_ground(12.0, 0.0, "car"), "car"), behind), np.random.default_rng(0))
    alone, hidden = (owner_alone == 0).sum(), (owner_hidden == 1).sum()
    assert alone > 30
    assert hidden < 0.2 * alone


@pytest.mark.parametrize("name,x,y,yaw", [("car", 12.0, 0.0, 0.0), ("truck", 6.0, -9.0, 0.7),
                                          ("pedestrian", -5.0, 4.0, 2.0)])
def test_returns_only_on_faces_turned_to_the_sensor(name, x, y, yaw):
    box = np.array(_on_ground(x, y, name, yaw))
    points, owner = render(_scene((box.tolist(), name)), np.random.default_rng(1))
    local = _box_frame(points[owner == 0, :3], box)
    sensor = _box_frame(np.zeros((1, 3)), box)[0]
    half = box[3:6] / 2 - INSET  # the rendered solid
    visible = np.abs(sensor) > half  # per axis: the face on the sensor's side; the opposite one is hidden
    assert visible.any()
    on_visible_face = np.zeros(len(local), dtype=bool)
    for axis in np.flatnonzero(visible):
        on_visible_face |= np.abs(local[:, axis] - np.sign(sensor[axis]) * half[axis]) < 0.05
    assert len(local) > 10
    assert on_visible_face.all()
