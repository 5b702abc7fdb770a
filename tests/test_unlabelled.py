"""Unlabelled scans: their info files, their teacher targets in a cache, and training on them beside labelled ones
(the detection loss never sees them; every distillation term does)."""
from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache.errors import CacheMismatchError, ConfigError
from featcache.teacher import unlabelled
from featcache.teacher.build import BuildOptions, build_cache
from lidar_fixtures import REPO
from trainer.unlabelled import WithUnlabelled, WithUnlabelledBatchSampler

TEACHER = str(REPO / "configs/demo/teacher_pillar.py")
TEACHER_CKPT = str(REPO / "checkpoints/demo_teacher_pillar.pth")
STUDENT = str(REPO / "configs/demo/student_half.py")
DRIVE = "drive"  # the unlabelled scans' folder, below the dataset's data_prefix.pts (samples/LIDAR_TOP)


def _yaw(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _pose(rotation: np.ndarray, translation) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = rotation, translation
    return pose


def _converter_lidar2sensor(key_l2e, key_e2g, sweep_l2e, sweep_e2g) -> np.ndarray:
    """What mmdet3d writes for a keyframe's sweep: nuScenes' ``obtain_sensor2top`` (create_data.py, row-vector
    form) for sensor2lidar R, T, then ``update_infos_to_v2.py``'s ``[[R^T, -R^T T], [0, 1]]``."""
    l2e_r, l2e_t, e2g_r, e2g_t = key_l2e[:3, :3], key_l2e[:3, 3], key_e2g[:3, :3], key_e2g[:3, 3]
    l2e_r_s, l2e_t_s, e2g_r_s, e2g_t_s = sweep_l2e[:3, :3], sweep_l2e[:3, 3], sweep_e2g[:3, :3], sweep_e2g[:3, 3]
    back = np.linalg.inv(e2g_r).T @ np.linalg.inv(l2e_r).T
    rotation = (l2e_r_s.T @ e2g_r_s.T) @ back
    translation = (l2e_t_s @ e2g_r_s.T + e2g_t_s) @ back
    translation -= e2g_t @ back + l2e_t @ np.linalg.inv(l2e_r).T
    sensor2lidar_r = rotation.T
    stored = np.eye(4)
    stored[:3, :3] = sensor2lidar_r.T
    stored[:3, 3] = -sensor2lidar_r.T @ translation
    return stored


@pytest.fixture(scope="module")
def keyframe_with_sweeps(tmp_path_factory, nus_one) -> Path:
    """nus_one's keyframe with three sweeps (copies of its scan at other poses) listed as mmdet3d writes them."""
    root = tmp_path_factory.mktemp("sweeps")
    shutil.copytree(nus_one, root, dirs_exist_ok=True)
    with open(root / "infos.pkl", "rb") as handle:
        infos = pickle.load(handle)
    keyframe = infos["data_list"][0]
    scan = root / "samples" / "LIDAR_TOP" / keyframe["lidar_points"]["lidar_path"]
    (root / "sweeps" / "LIDAR_TOP").mkdir(parents=True)
    key_l2e, key_e2g = np.asarray(keyframe["lidar_points"]["lidar2ego"]), np.asarray(keyframe["ego2global"])
    sweeps = []
    for index in range(3):  # newest first, as nuScenes lists them; the ego drove ~1 m and turned between sweeps
        sweep_e2g = key_e2g @ _pose(_yaw(-0.02 * (index + 1)), [-1.1 * (index + 1), 0.05 * index, 0.0])
        sweep_l2e = key_l2e @ _pose(_yaw(0.001 * index), [0.0, 0.0, 0.01 * index])
        name = f"sweep{index}.pcd.bin"
        shutil.copy(scan, root / "sweeps" / "LIDAR_TOP" / name)
        sweeps.append({"timestamp": keyframe["timestamp"] - 0.05 * (index + 1), "ego2global": sweep_e2g.tolist(),
                       "sample_data_token": f"sweep-token-{index}",
                       "lidar_points": {"lidar_path": f"./data/nuscenes/sweeps/LIDAR_TOP/{name}",  # as converted
                                        "lidar2ego": sweep_l2e.tolist(),
                                        "lidar2sensor": _converter_lidar2sensor(key_l2e, key_e2g, sweep_l2e,
                                                                                sweep_e2g).tolist()}})
    keyframe["lidar_sweeps"] = sweeps
    with open(root / "infos.pkl", "wb") as handle:
        pickle.dump(infos, handle)
    return root


def test_sweeps_become_samples_placed_as_mmdet3ds_converter_places_a_keyframes_sweeps(keyframe_with_sweeps):
    from mmdet3d.datasets import NuScenesDataset

    from featcache.teacher import models

    models.init_mmdet3d_scope()
    infos = unlabelled.load_infos(keyframe_with_sweeps / "infos.pkl")
    keyframe = infos["data_list"][0]
    reference = unlabelled.lidar_to_global(keyframe, "keyframe")
    for sweep in keyframe["lidar_sweeps"]:  # the keyframe's own sweeps, as mmdet3d's converter wrote them
        ours = np.asarray(unlabelled.lidar2sensor(reference, unlabelled.lidar_to_global(sweep, "sweep")))
        np.testing.assert_allclose(ours, np.asarray(sweep["lidar_points"]["lidar2sensor"]), atol=2e-5)

    data_list, report = unlabelled.sweep_infos(infos, "infos.pkl")
    assert [info["token"] for info in data_list] == ["sweep-token-0", "sweep-token-1", "sweep-token-2"]
    assert [len(info["lidar_sweeps"]) for info in data_list] == [2, 1, 0]
    assert report.earlier_sweeps == {2: 1, 1: 1, 0: 1} and "not linked" in report.summary()
    assert all(unlabelled.is_unlabelled(info) and info["instances"] == [] for info in data_list)
    assert data_list[0]["lidar_points"]["lidar_path"] == "../../sweeps/LIDAR_TOP/sweep0.pcd.bin"
    out = unlabelled.write_infos(keyframe_with_sweeps / "unlabelled.pkl", data_list, infos["metainfo"])

    # mmdet3d reads them as a split: sweep 0 as a sample with its two earlier sweeps, moved into its frame
    pipeline = [dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
                dict(type="LoadPointsFromMultiSweeps", sweeps_num=9, use_dim=[0, 1, 2, 3, 4], remove_close=False,
                     test_mode=True)]
    dataset = NuScenesDataset(str(keyframe_with_sweeps) + "/", out, pipeline=pipeline, test_mode=True,
                              data_prefix=dict(pts="samples/LIDAR_TOP", sweeps="sweeps/LIDAR_TOP"),
                              modality=dict(use_lidar=True, use_camera=False))
    scan = np.fromfile(keyframe_with_sweeps / "sweeps" / "LIDAR_TOP" / "sweep0.pcd.bin", dtype=np.float32).reshape(-1, 5)
    from featcache.teacher.samples import item_keys, item_sources

    assert item_keys(dataset) == [info["token"] for info in data_list]
    assert item_sources(dataset) == [f"sweeps/LIDAR_TOP/sweep{index}.pcd.bin" for index in range(3)]
    points = dataset[0]["points"].tensor.numpy()
    assert len(points) == 3 * len(scan)
    stored = np.asarray(data_list[0]["lidar_sweeps"][0]["lidar_points"]["lidar2sensor"])
    np.testing.assert_allclose(points[len(scan):2 * len(scan), :3], scan[:, :3] @ stored[:3, :3] - stored[:3, 3],
                               atol=1e-3)


def test_unlabelled_infos_command_writes_scans_and_keeps_an_existing_file(tmp_path, nus_one):
    from featcache.cli import main

    drive = tmp_path / "samples" / "LIDAR_TOP" / DRIVE
    drive.mkdir(parents=True)
    for index in range(2):
        shutil.copy(next((nus_one / "samples" / "LIDAR_TOP").glob("*.bin")), drive / f"scan{index}.bin")
    out = tmp_path / "unlabelled.pkl"
    result = CliRunner().invoke(main, ["unlabelled-infos", str(out), "--from-scans", str(drive),
                                       "--relative-to", str(tmp_path / "samples" / "LIDAR_TOP")])
    assert result.exit_code == 0, result.output
    written = unlabelled.load_infos(out)["data_list"]
    assert [info["lidar_points"]["lidar_path"] for info in written] == [f"{DRIVE}/scan0.bin", f"{DRIVE}/scan1.bin"]
    assert all("token" not in info and unlabelled.is_unlabelled(info) for info in written)
    before = out.read_bytes()
    again = CliRunner().invoke(main, ["unlabelled-infos", str(out), "--from-scans", str(drive)])
    assert again.exit_code != 0 and "--overwrite" in again.output and out.read_bytes() == before
    neither = CliRunner().invoke(main, ["unlabelled-infos", str(tmp_path / "x.pkl")])
    assert neither.exit_code != 0 and "--from-infos" in neither.output
    (drive / "odd.bin").write_bytes(b"\0" * 12)  # 3 floats: not whole points of 5
    odd = CliRunner().invoke(main, ["unlabelled-infos", str(tmp_path / "y.pkl"), "--from-scans", str(drive)])
    assert odd.exit_code != 0 and "odd.bin" in odd.output and "--num-pts-feats" in odd.output


@pytest.fixture(scope="module")
def scans_with_unlabelled(tmp_path_factory) -> tuple[Path, str]:
    """Six labelled generated demo scans (the demo's generator, seeded) plus three more, generated apart, as
    unlabelled scans below samples/LIDAR_TOP/drive, and their info file."""
    root = tmp_path_factory.mktemp("with_unlabelled")
    for name, train, seed in (("scenes", 6, 11), ("extra", 3, 12)):
        subprocess.run([sys.executable, str(REPO / "tools/generate_scenes.py"), "--out", str(root / name), "--train",
                        str(train), "--val", "1", "--seed", str(seed), "--range", "40"], check=True, capture_output=True)
    lidar = root / "scenes" / "samples" / "LIDAR_TOP"
    (lidar / DRIVE).mkdir()
    for index, scan in enumerate(sorted((root / "extra" / "samples" / "LIDAR_TOP").glob("synth_train_*.bin"))):
        shutil.copy(scan, lidar / DRIVE / f"unlabelled{index}.pcd.bin")
    data_list = unlabelled.scan_infos(lidar / DRIVE, 5, relative_to=lidar)
    return root / "scenes", unlabelled.write_infos(root / "unlabelled.pkl", data_list, {})


def _build(root: Path, out: Path, ann_file: str, boxes: bool = True) -> str:
    options = {"train_dataloader.dataset.data_root": f"{root}/", "train_dataloader.dataset.ann_file": ann_file}
    result = build_cache(BuildOptions(TEACHER, TEACHER_CKPT, str(out), layers="pts_neck", head_outputs="all",
                                      boxes=boxes, cfg_options=options, num_workers=0, progress=False))
    assert result.invalid_keys == []
    return str(out)


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory, scans_with_unlabelled) -> tuple[str, str]:
    """The demo teacher's targets of the labelled scans and, apart, of the unlabelled ones."""
    root, ann_file = scans_with_unlabelled
    out = tmp_path_factory.mktemp("unlabelled_caches")
    return (_build(root, out / "labelled", "nuscenes_infos_train.pkl"),
            _build(root, out / "unlabelled", ann_file))


def test_the_cache_records_its_unlabelled_scans_and_keeps_their_regression_outputs_at_the_teachers_boxes(
        two_caches, scans_with_unlabelled, tmp_path):
    from featcache import open_cache

    labelled, unlabelled_cache = (open_cache(location) for location in two_caches)
    assert labelled.manifest.unlabelled_samples == 0 and unlabelled_cache.manifest.unlabelled_samples == 3
    assert list(unlabelled_cache.row_keys) == [f"samples/LIDAR_TOP/{DRIVE}/unlabelled{index}.pcd.bin" for index in range(3)]
    reg = next(layer.name for layer in unlabelled_cache.manifest.layers if layer.meaning and
               layer.meaning.get("kind") == "reg")
    values, _ = unlabelled_cache.read_row_tensors(0, [reg])[reg]
    boxes = unlabelled_cache.read_boxes(0)
    assert len(boxes) > 0 and torch.count_nonzero(values.float()) > 0  # kept at the teacher's own boxes
    root, ann_file = scans_with_unlabelled
    with pytest.raises(ConfigError, match=r"3 of the split's 3 samples are unlabelled scans.*add --boxes"):
        _build(root, tmp_path / "no_boxes", ann_file, boxes=False)
    assert not (tmp_path / "no_boxes").exists()


def _options(root: Path, **extra):
    from trainer.train import TrainOptions

    cfg_options = {"train_dataloader.dataset.data_root": f"{root}/",
                   "train_cfg.max_epochs": 1, "train_dataloader.num_workers": 0,
                   "train_dataloader.persistent_workers": False, "train_dataloader.batch_size": 2}
    return TrainOptions(STUDENT, extra.pop("cache"), cfg_options=cfg_options, **extra)


def test_unlabelled_scans_reach_every_distillation_term_and_never_the_detection_loss(
        two_caches, scans_with_unlabelled, tmp_path, monkeypatch):
    from mmdet3d.models.detectors import MVXTwoStageDetector

    from trainer.distiller import CacheDistiller
    from trainer.train import train

    labelled_cache, unlabelled_cache = two_caches
    root, ann_file = scans_with_unlabelled
    detection, distilled = [], []
    original_loss, original_step = MVXTwoStageDetector.loss, CacheDistiller._step

    def detection_loss(self, inputs, data_samples, **kwargs):
        detection.append([sample.metainfo.get("cache_key") for sample in data_samples])  # None: the shape probe
        assert len(inputs["points"]) == len(data_samples) == int(inputs["voxels"]["coors"][:, 0].max()) + 1
        return original_loss(self, inputs, data_samples, **kwargs)

    def step(self, recorded, raw, data_samples, *args, **kwargs):
        distilled.append([sample.metainfo["cache_key"] for sample in data_samples])
        assert all(len(value) == len(data_samples) for value in recorded.values())
        return original_step(self, recorded, raw, data_samples, *args, **kwargs)

    monkeypatch.setattr(MVXTwoStageDetector, "loss", detection_loss)
    monkeypatch.setattr(CacheDistiller, "_step", step)
    train(_options(root, cache=labelled_cache, work_dir=str(tmp_path / "wd"), kd={"heatmap": 1.0, "pkd": 1.0},
                   unlabelled=dict(ann_file=ann_file, cache=unlabelled_cache)))
    unlabelled_keys = {f"samples/LIDAR_TOP/{DRIVE}/unlabelled{index}.pcd.bin" for index in range(3)}
    # the probe before training runs the plain student on one labelled sample; then 3 steps of 2 + 2
    steps = detection[-3:]
    assert [len(keys) for keys in steps] == [2, 2, 2] and not unlabelled_keys & {key for keys in detection for key in keys}
    assert len({key for keys in steps for key in keys}) == 6  # every labelled frame once, as without --unlabelled
    assert [len(keys) for keys in distilled] == [4, 4, 4]
    for labelled_part, keys in zip(steps, distilled):
        assert keys[:2] == labelled_part and set(keys[2:]) <= unlabelled_keys
    drawn = [key for keys in distilled for key in keys[2:]]
    assert set(drawn) == unlabelled_keys and all(drawn.count(key) == 2 for key in unlabelled_keys)


def test_the_pseudo_label_baseline_trains_the_detection_loss_on_the_teachers_confident_boxes(
        two_caches, scans_with_unlabelled, tmp_path, monkeypatch):
    from mmdet3d.models.detectors import MVXTwoStageDetector

    from trainer.train import train

    labelled_cache, unlabelled_cache = two_caches
    root, ann_file = scans_with_unlabelled
    seen, boxes = [], []
    original_loss = MVXTwoStageDetector.loss

    def detection_loss(self, inputs, data_samples, **kwargs):
        for sample in data_samples:
            if sample.metainfo.get("pseudo_labelled"):
                teacher = sample.teacher_instances_3d
                confident = teacher.scores_3d >= 0.3
                assert torch.equal(sample.gt_instances_3d.bboxes_3d.tensor, teacher.bboxes_3d.tensor[confident])
                assert torch.equal(sample.gt_instances_3d.labels_3d, teacher.labels_3d[confident])
                boxes.append(int(confident.sum()))
        seen.append(sum(1 for sample in data_samples if sample.metainfo.get("pseudo_labelled")))
        return original_loss(self, inputs, data_samples, **kwargs)

    monkeypatch.setattr(MVXTwoStageDetector, "loss", detection_loss)
    train(_options(root, cache=labelled_cache, work_dir=str(tmp_path / "wd"), kd={"heatmap": 1.0},
                   unlabelled=dict(ann_file=ann_file, cache=unlabelled_cache, pseudo_labels=0.3)))
    assert seen[-3:] == [2, 2, 2]  # each step: its 2 labelled samples and 2 pseudo-labelled scans in one loss
    assert sum(boxes) > 0  # the demo teacher's confident boxes became GT


def test_two_process_gloo_ddp_trains_with_unlabelled_scans(two_caches, scans_with_unlabelled, tmp_path):
    import json
    import os

    from lidar_fixtures import cfg_option_args, free_port

    labelled_cache, unlabelled_cache = two_caches
    root, ann_file = scans_with_unlabelled
    options = {"train_dataloader.dataset.data_root": f"{root}/", "train_cfg.max_epochs": 1,
               "train_dataloader.num_workers": 0, "train_dataloader.persistent_workers": False,
               "default_hooks.logger.interval": 1}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "trainer.cli", "train", STUDENT, "--cache", labelled_cache, "--work-dir",
               str(tmp_path / "ddp"), "--kd", "heatmap=1:loss=focal,pkd=1", "--unlabelled", ann_file,
               "--unlabelled-cache", unlabelled_cache, *cfg_option_args(options)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = [json.loads(line) for line in next((tmp_path / "ddp").glob("*/vis_data/scalars.json")).read_text().splitlines()]
    steps = [entry for entry in logs if "kd_unlabelled_samples" in entry]
    # 6 labelled scans / (2 ranks x batch 2): 2 steps per rank (2 and 1 labelled), each with as many unlabelled
    assert [entry["kd_unlabelled_samples"] for entry in steps] == [2.0, 1.0]
    assert all(np.isfinite(entry["loss"]) for entry in steps)


def test_unlabelled_scans_not_in_their_cache_or_also_labelled_are_refused_by_name(two_caches, scans_with_unlabelled):
    from trainer.train import build_runner_config

    labelled_cache, unlabelled_cache = two_caches
    root, ann_file = scans_with_unlabelled
    with pytest.raises(CacheMismatchError, match=rf"3 of --unlabelled {ann_file}'s 3 scans are not in cache "
                                                 rf"{labelled_cache} .*e.g. 'samples/LIDAR_TOP/{DRIVE}/unlabelled0"):
        build_runner_config(_options(root, cache=labelled_cache, kd={"pkd": 1.0}, unlabelled=dict(ann_file=ann_file)))
    with pytest.raises(ConfigError, match=r"--kd crd keeps a memory row per cached sample"):
        build_runner_config(_options(root, cache=labelled_cache, kd={"crd": 1.0},
                                     unlabelled=dict(ann_file=ann_file, cache=unlabelled_cache)))
    with pytest.raises(ConfigError, match=r"6 of its samples are labelled training samples too"):
        build_runner_config(_options(root, cache=labelled_cache, kd={"pkd": 1.0},
                                     unlabelled=dict(ann_file=str(root / "nuscenes_infos_train.pkl"))))
    with pytest.raises(ConfigError, match=r"--no-distill trains none"):
        build_runner_config(_options(root, cache=None, no_distill=True, unlabelled=dict(ann_file=ann_file)))
    with pytest.raises(ConfigError, match=r"--online-teacher is for comparisons"):
        build_runner_config(_options(root, cache=None, online_teacher=(TEACHER, TEACHER_CKPT), kd={"pkd": 1.0},
                                     unlabelled=dict(ann_file=ann_file)))


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, size: int) -> None:
        self.size, self.metainfo = size, {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def _batches(labelled: int, unlabelled_count: int, epoch: int, per_labelled: int = 1, rank: int = 0,
             world_size: int = 1, seed: int = 7) -> list[list[int]]:
    from mmengine.dataset import DefaultSampler

    dataset = WithUnlabelled(_Indexed(labelled), _Indexed(unlabelled_count))
    sampler = DefaultSampler(dataset, shuffle=True, seed=seed)
    sampler.rank, sampler.world_size = rank, world_size
    sampler.num_samples = len(range(rank, labelled, world_size))
    sampler.total_size = labelled
    batches = WithUnlabelledBatchSampler(sampler, batch_size=2, per_labelled=per_labelled)
    batches.rank, batches.world_size = rank, world_size
    batches.sampler.set_epoch(epoch)
    return list(batches)


def test_each_step_is_the_labelled_batch_plus_unlabelled_scans_drawn_without_repeats_and_resumable():
    from mmengine.dataset import DefaultSampler

    plain = DefaultSampler(_Indexed(7), shuffle=True, seed=7)
    plain.set_epoch(1)
    batches = _batches(7, 5, epoch=1, per_labelled=2)
    assert [index for batch in batches for index in batch if index < 7] == list(plain)  # the labelled order kept
    assert [len(batch) for batch in batches] == [6, 6, 6, 3]  # 2 labelled + 4 unlabelled; the short last one 1 + 2
    assert all(index < 7 for batch in batches for index in batch[:len(batch) // 3])
    stream = [index - 7 for epoch in range(3) for batch in _batches(7, 5, epoch, 2) for index in batch if index >= 7]
    for start in range(0, 40, 5):  # every scan once before any twice: whole permutations, one after the other
        assert sorted(stream[start:start + 5]) == list(range(5))
    # a resumed run (a fresh sampler at epoch 2) draws what the uninterrupted one did
    assert _batches(7, 5, epoch=2, per_labelled=2) == _batches(7, 5, epoch=2, per_labelled=2)
    assert [i for b in _batches(7, 5, 2, 2) for i in b if i >= 7] == [i + 7 for i in stream[28:42]]
    # two ranks share the stream without drawing the same entry
    ranks = [[i for b in _batches(8, 16, 0, 1, rank, 2) for i in b if i >= 8] for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4 and len(set(ranks[0] + ranks[1])) == 8
