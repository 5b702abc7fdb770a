"""Faults while training from a cache: a damaged sample (with and without --skip-corrupt), a
read-only cache, two trainers on one cache, and kill -9 of a trainer then --resume.

Runs are kept to a few iterations of the un-augmented pillar student on two or four of the six
frames; runs that do not depend on each other overlap, one thread each, on the two cores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import REPO, cfg_option_args, chunk_file

NOAUG = str(REPO / "tests" / "configs" / "pillar_half_noaug.py")
TRAIN = [sys.executable, "-m", "trainer.cli", "train"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train_command(cache: str | Path, work_dir: Path, data_root: Path, *extra: str, samples: int = 2,
                   batch_size: int = 2, epochs: int = 1, workers: int = 0) -> list[str]:
    options = {"train_dataloader.dataset.data_root": f"{data_root}/", "train_dataloader.dataset.ann_file": "infos.pkl",
               "train_dataloader.dataset.indices": samples, "train_dataloader.batch_size": batch_size,
               "train_cfg.max_epochs": epochs, "train_dataloader.num_workers": workers,
               "train_dataloader.persistent_workers": False,
               "log_processor.window_size": 1}  # log each iteration's own losses, not a running mean
    return TRAIN + [NOAUG, "--cache", str(cache), "--work-dir", str(work_dir), *cfg_option_args(options), *extra]


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as output:  # a file, not a pipe: a pipe nobody drains would stall the trainer
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=ONE_THREAD)
    process.log = log
    return process


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    """Exit status and output (mmengine's log and Python's warnings) of a run."""
    process.wait(timeout=900)
    return process.returncode, process.log.read_text()


TIMINGS = {"step", "epoch", "iter", "time", "data_time", "eta", "memory"}


def _scalars_by_iteration(work_dir: Path) -> dict[int, dict[str, float]]:
    """Per-iteration losses, grad norm and lr of the latest run in ``work_dir`` (mmengine's
    vis_data/scalars.json), without the timings."""
    runs = sorted(work_dir.glob("*/vis_data/scalars.json"))
    assert runs, f"no scalars.json under {work_dir}"
    entries = [json.loads(line) for line in runs[-1].read_text().splitlines()]
    return {entry["step"]: {key: value for key, value in entry.items() if key not in TIMINGS}
            for entry in entries if "loss" in entry}


def _all_finite(scalars: dict[int, dict[str, float]]) -> bool:
    return all(np.isfinite(list(terms.values())).all() for terms in scalars.values())


def _file_contents(root: str | Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(Path(root).rglob("*")) if path.is_file()}


def test_corrupt_sample_stops_training_by_name_or_is_skipped_and_counted(reference_cache, nus_six, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    bad_key = open_cache(cache).row_keys[1]  # one of the two samples trained on
    cut = chunk_file(cache, "pts_neck.0", 1)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    strict = _start(_train_command(cache, tmp_path / "strict", nus_six), tmp_path / "strict.log")
    skipping = _start(_train_command(cache, tmp_path / "skipping", nus_six, "--skip-corrupt", workers=1),
                      tmp_path / "skipping.log")
    code, output = _finish(strict)
    assert code == 1 and "Traceback" not in output, output[-3000:]
    assert re.search(f"CorruptSampleError: sample '{bad_key}' .*pts_neck.0", output), output[-3000:]
    assert not list((tmp_path / "strict").glob("*.pth"))

    code, output = _finish(skipping)
    assert code == 0, output[-3000:]
    # each skip is a warning naming the sample, with the running count (it is read in a DataLoader worker)
    skips = re.findall(rf"skipping sample '{bad_key}' \((\d+) skipped in this worker\)", output)
    assert skips and [int(count) for count in skips] == list(range(1, len(skips) + 1)), output[-3000:]
    scalars = _scalars_by_iteration(tmp_path / "skipping")
    assert list(scalars) == [1] and _all_finite(scalars)
    assert (tmp_path / "skipping" / "epoch_1.pth").is_file()


@pytest.fixture
def read_only_cache(reference_cache, tmp_path):
    """The reference cache through a read-only bind mount (chmod does not stop root from writing)."""
    view = tmp_path / "read_only_cache"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", reference_cache, str(view)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a read-only bind mount needs root and mount(8): {mounted.stderr.strip()}")
    try:
        remounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount the bind mount read-only: {remounted.stderr.strip()}")
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_training_from_a_read_only_cache_never_writes_to_it(read_only_cache, reference_cache, nus_six, tmp_path):
    with pytest.raises(OSError, match="Read-only file system"):  # any write attempt would fail the run
        (read_only_cache / "probe").write_bytes(b"")
    before = _file_contents(reference_cache)
    code, output = _finish(_start(_train_command(read_only_cache, tmp_path / "wd", nus_six, workers=1),
                                  tmp_path / "train.log"))
    assert code == 0, output[-3000:]
    scalars = _scalars_by_iteration(tmp_path / "wd")
    assert list(scalars) == [1] and _all_finite(scalars)
    assert _file_contents(reference_cache) == before


def test_two_trainers_read_one_cache_at_once(reference_cache, nus_six, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    before = _file_contents(cache)
    trainers = [_start(_train_command(cache, tmp_path / f"trainer_{index}", nus_six, samples=4, workers=1),
                       tmp_path / f"trainer_{index}.log") for index in range(2)]
    for index, trainer in enumerate(trainers):
        code, output = _finish(trainer)
        assert code == 0, output[-3000:]
        scalars = _scalars_by_iteration(tmp_path / f"trainer_{index}")
        assert list(scalars) == [1, 2] and _all_finite(scalars)
    assert _file_contents(cache) == before
    assert verify_cache(str(cache)).ok


def test_training_killed_after_a_checkpoint_resumes_with_the_same_losses(reference_cache, nus_six, tmp_path):
    # the un-augmented student without DataLoader workers is deterministic for a fixed thread count
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    command = {work_dir: _train_command(reference_cache, work_dir, nus_six, batch_size=1, epochs=2)
               for work_dir in (straight, interrupted)}
    uninterrupted = _start(command[straight], tmp_path / "straight.log")
    killed = _start(command[interrupted], tmp_path / "interrupted.log")
    last_checkpoint = interrupted / "last_checkpoint"  # mmengine writes it once epoch_1.pth is complete
    deadline = time.monotonic() + 600
    while not (last_checkpoint.is_file() and last_checkpoint.read_text().endswith("epoch_1.pth")):
        assert killed.poll() is None, killed.log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (interrupted / "epoch_2.pth").exists(), "the kill should land in the second epoch"

    code, output = _finish(_start(command[interrupted] + ["--resume"], tmp_path / "resumed.log"))
    assert code == 0, output[-3000:]
    code, output = _finish(uninterrupted)
    assert code == 0, output[-3000:]
    expected, resumed = _scalars_by_iteration(straight), _scalars_by_iteration(interrupted)
    assert list(expected) == [1, 2, 3, 4] and list(resumed) == [3, 4]  # 2 samples x 2 epochs, batch 1
    for step, terms in resumed.items():
        assert terms.keys() == expected[step].keys() and {"loss", "grad_norm", "loss_kd_crd_pts_neck__0"} <= set(terms)
        for name, value in terms.items():
            assert value == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (step, name)


def _clean_failure(command: list[str]) -> str:
    """Run a `featcache train` command that must fail on user input: exit 1, one error line, no traceback."""
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD, timeout=600)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr


def test_crd_on_a_one_sample_cache_says_what_to_use_instead(tmp_path, nus_one, pillar_ckpt):
    from featcache.teacher.build import BuildOptions, build_cache
    from lidar_fixtures import PILLAR_CONFIG, nus_cfg_options

    cache = tmp_path / "one"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(cache), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    error = _clean_failure(_train_command(cache, tmp_path / "wd", nus_one, samples=1, batch_size=1))
    assert "needs at least 2 cached samples" in error and "--kd infonce=1" in error


def test_a_checkpoint_of_another_model_is_named_not_loaded(reference_cache, nus_six, tmp_path):
    from featcache.teacher.checkpoint import load_checkpoint_file

    # a checkpoint of the distiller around a wider student: same tensor names, other shapes
    wide = tmp_path / "wide"
    command = _train_command(reference_cache, wide, nus_six, epochs=1)
    wider = ["--cfg-options", "model.pts_neck.out_channels=[96,96,96]", "--cfg-options",
             "model.pts_bbox_head.in_channels=288"]
    code, output = _finish(_start(command + wider, tmp_path / "wide.log"))
    assert code == 0, output[-3000:]
    checkpoint = wide / "epoch_1.pth"
    shapes = {k: tuple(v.shape) for k, v in load_checkpoint_file(checkpoint)["state_dict"].items()}
    error = _clean_failure(_train_command(reference_cache, tmp_path / "wd", nus_six) +
                           ["--cfg-options", f"load_from={checkpoint}"])
    assert f"checkpoint {checkpoint} does not fit this model" in error
    assert re.search(r"(\d+) of its \d+ shared tensors have other shapes", error)
    first = re.search(r"\(([\w.]+): checkpoint \(([\d, ]+)\)", error)
    assert first and shapes[first.group(1)] == tuple(int(x) for x in first.group(2).split(", "))
    # a plain student checkpoint given to a distillation run shares no tensor name with it
    error = _clean_failure(_train_command(reference_cache, tmp_path / "wd2", nus_six) +
                           ["--cfg-options", f"load_from={wide / 'student.pth'}"])
    assert "shares no tensor name with this model" in error


def test_a_teacher_grid_that_barely_overlaps_warns_with_both_ranges(reference_cache, nus_six, caplog):
    import logging

    from mmdet3d.registry import MODELS
    from mmengine.dataset import pseudo_collate

    from featcache.teacher import models
    from trainer.train import TrainOptions, build_runner_config

    options = {"train_dataloader.dataset.data_root": f"{nus_six}/", "train_dataloader.dataset.ann_file": "infos.pkl"}
    cfg = build_runner_config(TrainOptions(NOAUG, reference_cache, kd={"infonce": 1.0}, cfg_options=options))
    dataset = models.build_dataset(models.unwrap_dataset_cfg(cfg.train_dataloader.dataset))
    for teacher_range, warned in (([-51.2, -51.2, 51.2, 51.2], False), ([-20.0, -20.0, 20.0, 20.0], True)):
        cfg.model.teacher_range = teacher_range  # as if the cache came from a teacher with this BEV range
        model = MODELS.build(cfg.model).train()
        batch = model.data_preprocessor(pseudo_collate([dataset[0]]), True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainer.distiller"):
            losses = model.loss(batch["inputs"], batch["data_samples"])
            model.loss(batch["inputs"], batch["data_samples"])  # the warning is for the first step only
        messages = [record.getMessage() for record in caplog.records if "pts_neck__0" in record.getMessage()]
        assert len(messages) == (1 if warned else 0), [record.getMessage() for record in caplog.records]
        if warned:
            fraction = float(losses["kd_valid_fraction_pts_neck__0"])
            assert fraction < 0.2 and f"only {100 * fraction:.0f}%" in messages[0]
            assert str(teacher_range) in messages[0] and "[-51.2, -51.2, 51.2, 51.2]" in messages[0]
