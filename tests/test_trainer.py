"""`featcache train`: pillar students distilled from caches of real CenterPoint teachers."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.teacher import models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.errors import CacheMismatchError
from lidar_fixtures import (PILLAR_CONFIG, REPO, VOXEL_CONFIG, cfg_option_args, free_port, nus_cfg_options,
                            teacher_checkpoint)

HALF = str(REPO / "configs/students/centerpoint_pillar_half_nus.py")
QUARTER = str(REPO / "configs/students/centerpoint_pillar_quarter_nus.py")
NOAUG = str(REPO / "tests/configs/pillar_half_noaug.py")
FEATCACHE = [sys.executable, "-m", "trainer.cli"]


def student_options(data_root: Path, epochs: int = 2) -> dict:
    return {"train_dataloader.dataset.data_root": f"{data_root}/", "train_dataloader.dataset.ann_file": "infos.pkl",
            "train_cfg.max_epochs": epochs, "train_dataloader.num_workers": 0,
            "train_dataloader.persistent_workers": False}


@pytest.fixture(scope="session")
def pillar_cache(tmp_path_factory, nus_six, pillar_ckpt) -> str:
    """fp32 cache of every default layer of the pillar teacher over the six frames."""
    out = tmp_path_factory.mktemp("train_cache") / "pillar"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), codec="fp32-none",
                             cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    return str(out)


@pytest.fixture(scope="session")
def voxel_cache(tmp_path_factory, nus_six) -> str:
    """The BEVFusion-lidar-shaped voxel0075 teacher's neck (512 x 180 x 180 on a 54 m grid)."""
    ckpt = teacher_checkpoint(tmp_path_factory.mktemp("voxel_ckpt"), VOXEL_CONFIG, seed=5)
    out = tmp_path_factory.mktemp("train_cache") / "voxel"
    build_cache(BuildOptions(VOXEL_CONFIG, str(ckpt), str(out), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    return str(out)


def _scalars(work_dir: Path) -> list[dict]:
    runs = sorted(work_dir.glob("*/vis_data/scalars.json"))
    assert runs, f"no scalars.json under {work_dir}"
    return [json.loads(line) for line in runs[-1].read_text().splitlines()]


def _train(config: str, cache: str, work_dir: Path, data_root: Path, *extra: str, epochs: int = 2,
           env: dict | None = None, launcher: list[str] | None = None) -> list[dict]:
    args = (launcher or FEATCACHE) + ["train", config, "--cache", cache, "--work-dir", str(work_dir),
                                      *cfg_option_args(student_options(data_root, epochs)), *extra]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return _scalars(work_dir)


def _tree_digest(path: str) -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def test_two_students_train_from_one_pillar_cache(pillar_cache, nus_six, tmp_path):
    before = _tree_digest(pillar_cache)
    for config in (HALF, QUARTER):
        logs = _train(config, pillar_cache, tmp_path / Path(config).stem, nus_six, "--kd", "crd=1", epochs=4)
        kd = [entry["loss_kd_crd_pts_neck__0"] for entry in logs if "loss_kd_crd_pts_neck__0" in entry]
        total = [entry["loss"] for entry in logs if "loss" in entry]
        assert len(kd) == 12 and all(np.isfinite(kd)) and all(np.isfinite(total))
        # CRD scores against memory banks that hold random vectors until each sample has been seen
        # once (epoch 1 = iterations 1-3): learning shows from epoch 2 to the last
        assert np.mean(kd[-3:]) < np.mean(kd[3:6]), kd
        assert {"loss_kd_crd_pts_middle_encoder", "loss_kd_crd_pts_backbone__2", "task0.loss_heatmap"} <= set(logs[0])
        dumped = next((tmp_path / Path(config).stem).glob("*.py")).read_text()
        assert "CacheDistiller" in dumped and "PackDetInputsWithCache" in dumped
        assert (tmp_path / Path(config).stem / "epoch_4.pth").is_file()
    assert _tree_digest(pillar_cache) == before  # the cache was only read


def test_student_distils_from_voxel_teacher_across_grids(voxel_cache, nus_six, tmp_path):
    # the deprecated --loss still works (and means --kd infonce=1)
    logs = _train(QUARTER, voxel_cache, tmp_path / "wd", nus_six, "--loss", "infonce", epochs=2)
    kd = [entry["loss_kd_infonce_pts_neck__0"] for entry in logs if "loss_kd_infonce_pts_neck__0" in entry]
    assert len(kd) == 6 and all(np.isfinite(kd))
    # the 54 m teacher grid covers the student's 51.2 m grid; only the corners of scenes rotated by
    # the train pipeline (up to 22.5 degrees) and scaled up by up to 5% fall outside it
    valid = [entry["kd_valid_fraction_pts_neck__0"] for entry in logs if "kd_valid_fraction_pts_neck__0" in entry]
    assert 0.8 < min(valid) and max(valid) <= 1.0


def test_training_never_loads_a_teacher(pillar_cache, nus_six, tmp_path, monkeypatch):
    from featcache.teacher import checkpoint
    from trainer.train import TrainOptions, train

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded during cached training")

    monkeypatch.setattr(checkpoint, "load_weights", refuse)
    monkeypatch.setattr(models, "load_weights", refuse)
    sys.modules.pop("featcache.teacher.detector", None)
    allow_list = list(torch.serialization.get_safe_globals())
    runner = train(TrainOptions(NOAUG, pillar_cache, work_dir=str(tmp_path / "wd"),
                                cfg_options=student_options(nus_six, epochs=1)))
    # train() allows OpenMMLab's checkpoint types for its own run only, not for the caller's process
    left = [obj for obj in torch.serialization.get_safe_globals() if obj not in allow_list]
    assert not [obj for obj in checkpoint.safe_globals() if obj in left]
    distiller = runner.model
    assert distiller.teacher is None and "featcache.teacher.detector" not in sys.modules
    trained = {name.split(".")[0] for name, p in distiller.named_parameters() if p.requires_grad}
    assert trained == {"student", "terms"}


def test_cached_and_online_targets_give_the_same_losses(pillar_cache, nus_six, pillar_ckpt):
    from mmengine.dataset import pseudo_collate

    from trainer.train import TrainOptions, build_runner_config

    cached_cfg = build_runner_config(TrainOptions(NOAUG, pillar_cache, cfg_options=student_options(nus_six)))
    online_cfg = copy.deepcopy(cached_cfg)
    online_cfg.model.online_teacher = dict(config=PILLAR_CONFIG, checkpoint=str(pillar_ckpt), cfg_options={})
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cached_cfg.train_dataloader.dataset))
    from mmdet3d.registry import MODELS

    losses = {}
    for mode, cfg in (("cached", cached_cfg), ("online", online_cfg)):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        batch = model.data_preprocessor(pseudo_collate([dataset[0], dataset[3]]), True)
        losses[mode] = {k: float(v) for k, v in model.loss(batch["inputs"], batch["data_samples"]).items()}
    kd_keys = [key for key in losses["cached"] if key.startswith("loss_kd_")]
    assert len(kd_keys) == 5
    for key in losses["cached"]:
        assert losses["online"][key] == pytest.approx(losses["cached"][key], rel=1e-5, abs=1e-6), key


def test_train_sampler_keeps_the_students_order_and_announces_its_cache_rows(pillar_cache, nus_six):
    from mmengine.registry import DATA_SAMPLERS, init_default_scope

    from featcache import open_cache
    from featcache.teacher.samples import sample_key
    from trainer.train import TrainOptions, build_runner_config

    cfg = build_runner_config(TrainOptions(HALF, pillar_cache, cfg_options=student_options(nus_six)))
    wrapped = cfg.train_dataloader.sampler
    assert wrapped.type == "CacheReadaheadSampler" and wrapped.sampler.type == "DefaultSampler"
    assert wrapped.cache == pillar_cache
    init_default_scope("mmdet3d")
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    sampler = DATA_SAMPLERS.build(wrapped, default_args=dict(dataset=dataset, seed=7))
    plain = DATA_SAMPLERS.build(wrapped.sampler, default_args=dict(dataset=dataset, seed=7))
    cache = open_cache(pillar_cache)
    assert sampler.rows == [cache.row_of(sample_key(dataset.get_data_info(i))) for i in range(len(dataset))]
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        assert list(sampler) == list(plain) and len(sampler) == len(plain)
    assert list(plain) != list(range(len(dataset)))  # shuffled: the order really is the wrapped sampler's

    # mmengine hands the sampler the wrapped dataset: wrappers (CBGS, Repeat) repeat samples, and each
    # item maps to its sample's row
    from mmdet3d.registry import DATASETS

    balanced = DATASETS.build(dict(type="RepeatDataset", times=2,
                                   dataset=models.unwrap_dataset_cfg(cfg.train_dataloader.dataset)))
    assert len(balanced) == 2 * len(dataset)
    sampler = DATA_SAMPLERS.build(wrapped, default_args=dict(dataset=balanced, seed=7))
    assert sampler.rows == [cache.row_of(sample_key(balanced.get_data_info(i))) for i in range(len(balanced))]
    announced = []
    sampler.cache.prefetch = lambda rows, layers=None: announced.extend(rows)
    order = list(sampler)
    assert sorted(order) == list(range(len(balanced))) and announced == [sampler.rows[i] for i in order]


def test_resume_continues_with_identical_state(pillar_cache, nus_six, tmp_path):
    straight = tmp_path / "straight"
    _train(NOAUG, pillar_cache, straight, nus_six, epochs=2)
    interrupted = tmp_path / "interrupted"
    _train(NOAUG, pillar_cache, interrupted, nus_six, epochs=1)
    _train(NOAUG, pillar_cache, interrupted, nus_six, "--resume", epochs=2)
    from featcache.teacher.checkpoint import load_checkpoint_file

    a = load_checkpoint_file(straight / "epoch_2.pth")
    b = load_checkpoint_file(interrupted / "epoch_2.pth")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any("memory.memory_s" in key for key in a["state_dict"])  # CRD banks are resumed too
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), rtol=1e-5, atol=1e-6), key
    assert a["meta"]["iter"] == b["meta"]["iter"] == 6



def test_two_process_gloo_ddp_trains(pillar_cache, nus_six, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "trainer.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = _train(NOAUG, pillar_cache, tmp_path / "ddp", nus_six, epochs=1, env=env, launcher=launcher)
    kd = [entry["loss_kd_crd_pts_neck__0"] for entry in logs if "loss_kd_crd_pts_neck__0" in entry]
    assert len(kd) == 2 and all(np.isfinite(kd))  # 6 samples / (2 ranks x batch 2) = 2 iterations


def test_cache_of_other_samples_is_refused_before_training(tmp_path, nus_one, nus_six, pillar_ckpt):
    one = tmp_path / "one"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(one), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    from trainer.train import TrainOptions, build_runner_config

    with pytest.raises(CacheMismatchError, match="5 of 6 training samples .* are not in cache"):
        build_runner_config(TrainOptions(NOAUG, str(one), cfg_options=student_options(nus_six)))
    cli = subprocess.run(FEATCACHE + ["train", NOAUG, "--cache", str(one), "--work-dir", str(tmp_path / "wd"),
                                      *cfg_option_args(student_options(nus_six))], capture_output=True, text=True)
    assert cli.returncode == 1 and "not in cache" in cli.stderr
    assert not (tmp_path / "wd").exists() or not list((tmp_path / "wd").glob("*.pth"))


def test_no_distill_trains_the_plain_student_without_a_cache(nus_six):
    from trainer.train import TrainOptions, build_runner_config

    cfg = build_runner_config(TrainOptions(HALF, None, no_distill=True, cfg_options=student_options(nus_six)))
    assert cfg.model.type == "CenterPoint"
    assert cfg.train_dataloader.dataset.pipeline[-1]["type"] == "Pack3DDetInputs"
    with pytest.raises(Exception, match="needs --cache"):
        build_runner_config(TrainOptions(HALF, None, cfg_options=student_options(nus_six)))


def test_gt_paste_records_pasted_footprints():
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmdet3d.structures.points import LiDARPoints

    from trainer.transforms import ObjectSampleRecorded

    pasted = np.array([[10.0, 5.0, -1.0, 4.0, 2.0, 1.5, 0.3]], dtype=np.float32)

    class OneCarDatabase:  # stands in for DataBaseSampler (which needs a GT database on disk)
        def sample_all(self, gt_bboxes, gt_labels, img=None, ground_plane=None):
            return {"gt_bboxes_3d": pasted, "gt_labels_3d": np.array([0]),
                    "points": LiDARPoints(np.tile(np.array([[10.0, 5.0, -1.0, 1.0, 0.0]], np.float32), (3, 1)),
                                          points_dim=5)}

    transform = ObjectSampleRecorded.__new__(ObjectSampleRecorded)
    transform.disabled, transform.use_ground_plane, transform.sample_2d = False, False, False
    transform.db_sampler = OneCarDatabase()
    scene = {"gt_bboxes_3d": LiDARInstance3DBoxes(np.array([[1, 2, -1, 4, 2, 1.5, 0], [-5, 3, -1, 1, 1, 2, 1]],
                                                           np.float32)),
             "gt_labels_3d": np.array([0, 7]),
             "points": LiDARPoints(np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32), points_dim=5)}
    result = transform.transform(scene)
    assert len(result["gt_bboxes_3d"]) == 3
    assert np.allclose(result["pasted_boxes_bev"], [[10.0, 5.0, 4.0, 2.0, 0.3]])


def test_every_arm_starts_from_the_same_student_weights(pillar_cache, nus_six, pillar_ckpt, tmp_path):
    """Iteration 0 (a run of 0 epochs saves the initialised student): --no-distill, every term and an
    online teacher leave the generator the student's init_weights draws from untouched."""
    from featcache.teacher.checkpoint import load_checkpoint_file
    from trainer.train import TrainOptions, train

    options = {**student_options(nus_six), "train_cfg.max_epochs": 0, "randomness.seed": 3}
    arms = {"no-kd": dict(no_distill=True, cache=None),
            **{name: dict(kd={name: 1.0}, cache=pillar_cache) for name in ("crd", "infonce", "mse", "pkd")},
            "crd+infonce+pkd": dict(kd={"crd": 1.0, "infonce": 1.0, "pkd": 5.0}, cache=pillar_cache),
            "online": dict(kd={"infonce": 1.0}, cache=None, online_teacher=(PILLAR_CONFIG, str(pillar_ckpt)),
                           teacher_cfg_options=nus_cfg_options(nus_six))}
    weights = {}
    for arm, extra in arms.items():
        runner = train(TrainOptions(HALF, work_dir=str(tmp_path / arm), cfg_options=options, **extra))
        assert runner.iter == 0
        weights[arm] = load_checkpoint_file(tmp_path / arm / "student.pth")["state_dict"]
    reference = weights.pop("no-kd")
    for arm, state in weights.items():
        assert state.keys() == reference.keys(), arm
        for key, value in reference.items():
            assert torch.equal(state[key], value), (arm, key)
    # and the seed does decide them: another seed, other weights
    runner = train(TrainOptions(HALF, None, no_distill=True, work_dir=str(tmp_path / "seed4"),
                                cfg_options={**options, "randomness.seed": 4}))
    other = load_checkpoint_file(tmp_path / "seed4" / "student.pth")["state_dict"]
    assert not torch.equal(other["pts_backbone.blocks.0.0.weight"], reference["pts_backbone.blocks.0.0.weight"])


def test_kd_terms_come_from_the_flag_the_config_or_the_deprecated_loss_flag():
    from mmengine.config import Config

    from featcache.errors import ConfigError
    from trainer.options import TrainOptions, resolve_terms

    plain = Config(dict())
    configured = Config(dict(distill=dict(terms=dict(infonce=dict(weight=2.0, cells_per_sample=64), pkd=5.0),
                                          warmup_iters=30)))
    assert resolve_terms(plain, TrainOptions(HALF, None)) == ({"crd": {"weight": 1.0}}, 0)
    assert resolve_terms(configured, TrainOptions(HALF, None)) == (
        {"infonce": {"weight": 2.0, "cells_per_sample": 64}, "pkd": {"weight": 5.0}}, 30)
    # --kd picks terms and weights; parameters of a term the config names are kept
    assert resolve_terms(configured, TrainOptions(HALF, None, kd={"infonce": 1.0}, kd_warmup=0,
                                                  temperature=0.2)) == (
        {"infonce": {"weight": 1.0, "cells_per_sample": 64, "temperature": 0.2}}, 0)
    assert resolve_terms(plain, TrainOptions(HALF, None, loss="mse", alpha=3.0)) == ({"mse": {"weight": 3.0}}, 0)
    assert resolve_terms(plain, TrainOptions(HALF, None, alpha=2.0)) == ({"crd": {"weight": 2.0}}, 0)
    with pytest.raises(ConfigError, match="replaced by --kd"):
        resolve_terms(plain, TrainOptions(HALF, None, loss="crd", kd={"pkd": 1.0}))
    with pytest.raises(ConfigError, match="does not exist; choose from crd, heatmap, infonce, label, mse, pkd, reg"):
        resolve_terms(Config(dict(distill=dict(terms=dict(pdk=1.0)))), TrainOptions(HALF, None))
    with pytest.raises(ConfigError, match="no setting alpha"):
        resolve_terms(Config(dict(distill=dict(alpha=1.0))), TrainOptions(HALF, None))
