"""Fixtures the tests and the tools share (``mmengine.testing``'s place in mmengine): data laid out
from the real frames in ``../shared/data``, seeded teacher checkpoints, ``--cfg-options`` helpers and
cache comparisons. Tools import them from here, never through ``sys.path`` into ``tests/``.

``make_nuscenes_like`` lays out the real nuScenes LIDAR_TOP scan as mmdet3d's NuScenesDataset
reads it (``samples/LIDAR_TOP/*.bin`` + a v2 info pkl) and adds rigidly rotated/shifted copies
(points and boxes moved together, new tokens) when more than one frame is needed.

It knows the teacher wing (checkpoints of mmdet3d models); the storage core never imports it.
"""
from __future__ import annotations

import copy
import os
import pickle
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
# where the real frames are: FEATCACHE_SHARED_DATA, else the shared/ directory beside the checkout
SHARED_DATA = Path(os.environ.get("FEATCACHE_SHARED_DATA", REPO.parent / "shared" / "data"))
NUS_INFO = SHARED_DATA / "nuscenes" / "nuscenes_infos_demo.pkl"
PILLAR_CONFIG = "centerpoint/centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"
VOXEL_CONFIG = "centerpoint/centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"
KITTI_INFO = SHARED_DATA / "kitti" / "kitti_infos_demo.pkl"
# mmdet3d's packaged KITTI PointPillars: a single-stage VoxelNet (middle_encoder, backbone, neck), train set
# wrapped in a RepeatDataset
KITTI_CONFIG = "pointpillars/pointpillars_hv_secfpn_8xb6-160e_kitti-3d-car.py"


def _rotate_z(xyz: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    out = xyz.copy()
    out[..., 0] = c * xyz[..., 0] - s * xyz[..., 1]
    out[..., 1] = s * xyz[..., 0] + c * xyz[..., 1]
    return out


def make_nuscenes_like(root: Path, count: int) -> Path:
    """Write ``count`` frames under ``root`` and return it (``root/infos.pkl``)."""
    with open(NUS_INFO, "rb") as handle:
        infos = pickle.load(handle)
    base = infos["data_list"][0]
    lidar_name = base["lidar_points"]["lidar_path"]
    points = np.fromfile(SHARED_DATA / "nuscenes" / lidar_name, dtype=np.float32).reshape(-1, 5)
    (root / "samples" / "LIDAR_TOP").mkdir(parents=True, exist_ok=True)
    data_list = []
    for index in range(count):
        info = copy.deepcopy(base)
        angle, shift = 0.3 * index, np.array([0.7 * index, -0.4 * index, 0.0], dtype=np.float32)
        frame = points.copy()
        if index:
            frame[:, :3] = _rotate_z(frame[:, :3], angle) + shift
        name = lidar_name if index == 0 else lidar_name.replace(".pcd.bin", f"_gen{index}.pcd.bin")
        frame.tofile(root / "samples" / "LIDAR_TOP" / name)
        info["lidar_points"]["lidar_path"] = name
        info["token"] = base["token"] if index == 0 else f"{base['token'][:24]}gen{index:05d}"
        info["sample_idx"] = index
        info["images"] = {}
        info.pop("cam_instances", None)
        for instance in info["instances"]:
            box = np.asarray(instance["bbox_3d"], dtype=np.float64)
            if index:
                box[:3] = _rotate_z(box[None, :3], angle)[0] + shift
                box[6] += angle
            instance["bbox_3d"] = box.tolist()
        data_list.append(info)
    with open(root / "infos.pkl", "wb") as handle:
        pickle.dump({"metainfo": infos["metainfo"], "data_list": data_list}, handle)
    return root


def make_kitti_like(root: Path) -> Path:
    """The real KITTI scan laid out as mmdet3d's KITTI configs read it (``training/velodyne_reduced``,
    a v2 info pkl ``root/infos.pkl``, no tokens) under ``root``; returns ``root``."""
    with open(KITTI_INFO, "rb") as handle:
        infos = pickle.load(handle)
    velodyne = root / "training" / "velodyne_reduced"
    velodyne.mkdir(parents=True, exist_ok=True)
    for info in infos["data_list"]:
        name = info["lidar_points"]["lidar_path"]
        (velodyne / name).write_bytes((SHARED_DATA / "kitti" / name).read_bytes())
    with open(root / "infos.pkl", "wb") as handle:
        pickle.dump(infos, handle)
    return root


def _wrapped_train_cfg_options(data_root: Path, splits: tuple[str, ...]) -> dict[str, Any]:
    """data_root and ann_file of each split's loader, the train set wrapped once (``dataset.dataset``)."""
    options: dict[str, Any] = {}
    for split in splits:
        prefix = "train_dataloader.dataset.dataset" if split == "train" else f"{split}_dataloader.dataset"
        options[f"{prefix}.data_root"] = str(data_root) + "/"
        options[f"{prefix}.ann_file"] = "infos.pkl"
    return options


def kitti_cfg_options(data_root: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """--cfg-options pointing mmdet3d's KITTI configs at a make_kitti_like root (the train set is wrapped
    in a RepeatDataset, hence ``dataset.dataset``)."""
    return _wrapped_train_cfg_options(data_root, splits)


def nus_cfg_options(data_root: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """--cfg-options pointing an mmdet3d CenterPoint nuScenes config's loaders at a
    make_nuscenes_like root (its train set is wrapped in CBGSDataset, hence ``dataset.dataset``)."""
    return _wrapped_train_cfg_options(data_root, splits)


def save_openmmlab_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """Save ``model`` the way mmengine's Runner does, numpy scalars and HistoryBuffer included."""
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

    hub = MessageHub.get_instance("featcache-test-ckpt")
    hub.update_scalar("train/loss", np.float64(1.5))
    hub.update_scalar("train/lr", 0.001)
    checkpoint = {
        "meta": {"epoch": 1, "iter": np.int64(10), "seed": np.int64(0), "best_score": np.float64(0.5),
                 "mmengine_version": "0.10.7", "dataset_meta": {"classes": ("car",)}},
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": hub.state_dict(),
    }
    save_checkpoint(checkpoint, str(path))
    return path


def cfg_option_args(options: dict[str, Any]) -> list[str]:
    """``--cfg-options key=value`` command-line arguments for a dict of overrides."""
    return [arg for key, value in options.items() for arg in ("--cfg-options", f"{key}={value}")]


def teacher_checkpoint(directory: Path, config: str, seed: int) -> Path:
    """A seeded mmdet3d model saved as a real mmengine checkpoint; BN running variances are
    perturbed so that, unlike a fresh init, deep layers carry signal of varied scale."""
    from featcache.teacher import models

    torch.manual_seed(seed)
    model = models.build_model(models.load_config(config))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.05, 0.5)
    return save_openmmlab_checkpoint(model, directory / f"teacher_{seed}.pth")


def assert_same_cache(a: str | Path, b: str | Path) -> None:
    """Same keys, and every sample's stored bytes equal (read with checksums checked)."""
    from featcache.reader import open_cache

    left, right = open_cache(a), open_cache(b)
    assert left.row_keys == right.row_keys
    for row, key in enumerate(left.row_keys):
        stored_left, stored_right = left.read_row(row, decode=False), right.read_row(row, decode=False)
        assert stored_left.keys() == stored_right.keys(), key
        for layer, value in stored_left.items():
            assert np.array_equal(value, stored_right[layer]), (key, layer)


def chunk_file(location: str | Path, layer: str, row: int) -> Path:
    """The one file holding sample ``row`` of ``layer``'s values in a local cache (its array's path from the
    manifest, its chunk key from zarr: ``store.row_chunk_key``)."""
    from featcache import store
    from featcache.reader import open_cache

    path = open_cache(str(location)).manifest.layer(layer).values_array.path
    array = store.open_group(location)[path]
    chunk = Path(location) / path / store.row_chunk_key(array, row)
    assert chunk.is_file(), chunk
    return chunk


def free_port() -> int:
    """A TCP port free on loopback now (for torchrun masters and local test servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
