"""KITTI end to end on the real KITTI scan with mmdet3d's packaged PointPillars KITTI config (a
single-stage VoxelNet): `featcache build` with the default layers, then `featcache verify`, through
the command line as a user runs them."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from featcache.errors import ConfigError
from featcache.reader import open_cache
from lidar_fixtures import REPO, KITTI_CONFIG, kitti_cfg_options, make_kitti_like, save_openmmlab_checkpoint

FEATCACHE = [sys.executable, "-m", "featcache.cli"]


@pytest.fixture(scope="module")
def kitti(tmp_path_factory):
    return make_kitti_like(tmp_path_factory.mktemp("kitti"))


@pytest.fixture(scope="module")
def kitti_ckpt(tmp_path_factory):
    import torch

    from featcache.teacher import models

    torch.manual_seed(0)
    model = models.build_model(models.load_config(KITTI_CONFIG))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.05, 0.5)
    return save_openmmlab_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "pointpillars_kitti.pth")


@pytest.fixture(scope="module")
def kitti_build(kitti, kitti_ckpt, tmp_path_factory):
    """`featcache build` of the packaged config with the default layers, as a user types it (several
    KEY=VALUE items after one --cfg-options, as mmdet3d's tools take them)."""
    out = tmp_path_factory.mktemp("kitti_cache") / "cache"
    items = [f"{key}={value}" for key, value in kitti_cfg_options(kitti).items()]
    built = subprocess.run(FEATCACHE + ["build", KITTI_CONFIG, str(kitti_ckpt), "--out", str(out), "--num-workers", "0",
                                        "--cfg-options", *items], capture_output=True, text=True, timeout=600)
    return out, built


def test_kitti_pointpillars_builds_with_default_layers_and_verifies(kitti_build):
    out, built = kitti_build
    assert built.returncode == 0, built.stderr[-3000:]
    assert "wrote 1 samples" in built.stdout and "all zeros" not in built.stderr
    cache = open_cache(out)
    manifest = cache.manifest
    assert manifest.extra["modules"] == ["middle_encoder", "backbone", "neck"]
    assert manifest.layer("middle_encoder").shape == (64, 496, 432)  # 0.16 m pillars over 69.12 x 79.36 m
    assert manifest.layer("neck.0").shape == (384, 248, 216)
    assert list(cache.row_keys) == ["training/velodyne_reduced/000008.bin"]  # no token: the lidar path is the key
    assert manifest.teacher_code == {"modules": [], "files": {}}
    scatter = cache.read_row(0)["middle_encoder"]
    assert 0.001 < np.count_nonzero(scatter) / scatter.size < 0.5  # the scan's pillars, not an empty map

    verified = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0 and "1/1 samples verified" in verified.stdout
    assert "suspect" not in verified.stdout


def test_override_on_the_kitti_wrapper_says_where_it_belongs(kitti, kitti_ckpt, tmp_path):
    # the data root set on the RepeatDataset wrapper instead of the dataset it wraps: said so, before any teacher work
    wrapped = subprocess.run(FEATCACHE + ["build", KITTI_CONFIG, str(kitti_ckpt), "--out", str(tmp_path / "cache"),
                                          "--cfg-options", f"train_dataloader.dataset.data_root={kitti}/"],
                             capture_output=True, text=True, timeout=300)
    assert wrapped.returncode == 1
    assert "train_dataloader.dataset is a RepeatDataset (a dataset wrapper), which takes no 'data_root'" in wrapped.stderr
    assert "train_dataloader.dataset.dataset.data_root=" in wrapped.stderr
    assert not (tmp_path / "cache").exists()


STUDENT = str(REPO / "configs" / "students" / "pointpillars_kitti_car_student.py")


def test_kitti_student_config_trains_and_distils_from_the_tokenless_cache(kitti, kitti_build, tmp_path):
    from trainer.train import TrainOptions, train

    out, built = kitti_build
    assert built.returncode == 0, built.stderr[-3000:]
    loader = {"train_dataloader.batch_size": 1, "train_dataloader.num_workers": 0,
              "train_dataloader.persistent_workers": False}
    # the student config README describes (no GT-database paste, no val loop) trains on the one scan
    work_dir = tmp_path / "student"
    train(TrainOptions(student_config=STUDENT, cache=None, work_dir=str(work_dir), no_distill=True,
                       cfg_options={**kitti_cfg_options(kitti, ("train", "test")), **loader}))
    assert (work_dir / "epoch_1.pth").is_file()
    # distilling from the KITTI cache: its samples have no token, so the pack step keys each by its
    # lidar file relative to the dataset's data_root, as the build did, and reads that row's targets
    runner = train(TrainOptions(student_config=STUDENT, cache=str(out), work_dir=str(tmp_path / "kd"),
                                kd={"pkd": 1.0}, cfg_options={**kitti_cfg_options(kitti, ("train", "test")), **loader}))
    (key,) = open_cache(str(out)).keys()
    assert key.startswith("training/velodyne_reduced/") and key.endswith(".bin")  # relative: the data may move
    pack = next(step for step in runner.train_dataloader.dataset.dataset.pipeline.transforms
                if type(step).__name__ == "PackDetInputsWithCache")
    assert pack.data_root == str(kitti) + "/"
    losses = runner.message_hub.log_scalars
    kd = [name for name in losses if name.startswith("train/loss_kd_pkd_")]
    assert kd and all(np.isfinite(losses[name].current()) for name in kd)
    assert (tmp_path / "kd" / "student.pth").is_file()


def test_a_codec_for_a_layer_the_default_layers_lack_fails_before_the_teacher_runs(kitti, kitti_ckpt, tmp_path):
    from featcache.teacher.build import BuildOptions, build_cache

    options = BuildOptions(KITTI_CONFIG, str(kitti_ckpt), str(tmp_path / "cache"), codec="pts_neck=fp32-none",
                           cfg_options=kitti_cfg_options(kitti, ("train", "test")), num_workers=0, progress=False)
    with pytest.raises(ConfigError, match=r"--codec names layer 'pts_neck'.*middle_encoder, backbone, neck"):
        build_cache(options)
    assert not (tmp_path / "cache").exists()
