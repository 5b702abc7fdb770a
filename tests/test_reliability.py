"""Faults while building: a full disk, readers during a build, repeated kill -9 (tools/torture_build.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featcache import format, store
from featcache.errors import SampleNotCachedError
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import PILLAR_CONFIG, REPO, cfg_option_args, nus_cfg_options

FEATCACHE = [sys.executable, "-m", "featcache.cli"]


def _build_args(data: Path, ckpt: Path, out: Path) -> list[str]:
    return FEATCACHE + ["build", PILLAR_CONFIG, str(ckpt), "--out", str(out), "--layers", "pts_neck",
                        "--num-workers", "0", *cfg_option_args(nus_cfg_options(data))]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 12 MB tmpfs: room for the cache's arrays and about two pillar pts_neck samples."""
    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_disk_full_stops_cleanly_and_resumes(nus_six, pillar_ckpt, small_filesystem):
    out = small_filesystem / "cache"
    full = subprocess.run(_build_args(nus_six, pillar_ckpt, out), capture_output=True, text=True, timeout=600)
    assert full.returncode == 1, full.stderr[-2000:]
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr
    status = open_cache(out).status()
    complete = int((status == format.STATUS_COMPLETE).sum())
    assert 1 <= complete < 6
    report = verify_cache(str(out))
    assert report.complete == complete and not report.corrupt  # what is recorded is intact

    subprocess.run(["mount", "-o", "remount,size=200m", str(small_filesystem)], check=True)
    resumed = subprocess.run(_build_args(nus_six, pillar_ckpt, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"wrote {6 - complete} samples" in resumed.stdout
    assert verify_cache(str(out)).ok


def test_reader_during_a_build_sees_only_complete_samples(nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "cache"
    builder = subprocess.Popen(_build_args(nus_six, pillar_ckpt, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    reads, refusals = 0, 0
    deadline = time.monotonic() + 600
    while builder.poll() is None and time.monotonic() < deadline:
        if not store.exists(out):
            time.sleep(0.05)
            continue
        cache = open_cache(out)
        for row, key in enumerate(cache.keys):
            try:
                features = cache.read(key)
            except SampleNotCachedError:
                refusals += 1
                continue
            assert np.isfinite(features["pts_neck.0"]).all() and features["pts_neck.0"].any(), key
            reads += 1
        time.sleep(0.2)
    assert builder.wait() == 0
    assert reads > 0 and refusals > 0  # it saw the cache part-built, and never a partial sample
    assert verify_cache(str(out)).ok


def test_torture_build_with_kills_equals_uninterrupted(nus_six, pillar_ckpt, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "torture_build.py"), "--kills", "3",
                             "--data", str(nus_six), "--checkpoint", str(pillar_ckpt), "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 kills" in result.stdout and "identical to the uninterrupted build" in result.stdout
