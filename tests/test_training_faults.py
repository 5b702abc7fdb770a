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
    bad_key = open_cache(cache).keys[1]  # one of the two samples trained on
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
        assert terms.keys() == expected[step].keys() and {"loss", "grad_norm", "loss_kd_pts_neck__0"} <= set(terms)
        for name, value in terms.items():
            assert value == pytest.approx(expected[step][name], rel=1e-6, abs=1e-7), (step, name)
