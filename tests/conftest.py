"""Shared fixtures: the real lidar frames in ../shared/data and datasets derived from them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from featcache.testing import (PILLAR_CONFIG, SHARED_DATA, make_nuscenes_like, nus_cfg_options,  # noqa: E402
                               teacher_checkpoint)
from lidar_fixtures import CACHE_LAYERS  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "nuscenes" / "nuscenes_infos_demo.pkl").is_file():
        raise RuntimeError(f"real lidar frames not found at {SHARED_DATA}; set FEATCACHE_SHARED_DATA to the "
                           "shared/data directory (the tests need them and do not skip without them)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nus_one(tmp_path_factory, shared_data) -> Path:
    """The real nuScenes scan alone, laid out as mmdet3d's NuScenesDataset expects."""
    return make_nuscenes_like(tmp_path_factory.mktemp("nus_one"), count=1)


@pytest.fixture(scope="session")
def nus_six(tmp_path_factory, shared_data) -> Path:
    """Six frames: the real scan and five rigidly transformed copies (boxes moved with them)."""
    return make_nuscenes_like(tmp_path_factory.mktemp("nus_six"), count=6)


@pytest.fixture(scope="session")
def pillar_ckpt(tmp_path_factory) -> Path:
    """A CenterPoint-pillar teacher checkpoint (seed 0)."""
    return teacher_checkpoint(tmp_path_factory.mktemp("ckpt"), PILLAR_CONFIG, seed=0)


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, nus_six, pillar_ckpt) -> str:
    """An uninterrupted single-process build (default codec) of the six frames' CACHE_LAYERS. It
    is built in this process: a subprocess build compared with it needs
    OMP_NUM_THREADS=torch.get_num_threads() (CPU convolution sums depend on the thread count)."""
    from featcache.teacher.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("ref") / "cache"
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers=CACHE_LAYERS,
                                      cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    assert result.written == 6 and result.invalid_keys == []
    return str(out)


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch):
    # Two cores: torch's intra-op pool and DataLoader workers would otherwise oversubscribe them.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))


@pytest.fixture(autouse=True)
def _own_torch_allow_list():
    # torch's weights-only allow-list is process state: a test that changes it must not decide
    # what a later test's plain torch.load accepts
    import torch

    before = list(torch.serialization.get_safe_globals())
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(before)
