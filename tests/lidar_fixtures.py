"""The tests' own fixtures beside the shared ones of :mod:`featcache.testing` (re-exported here, so a test
imports every fixture from one place): the tests' configs, the reference cache's layers, tmpfs mounts."""
from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from featcache.testing import (KITTI_CONFIG, KITTI_INFO, NUS_INFO, PILLAR_CONFIG, SHARED_DATA,  # noqa: F401
                               VOXEL_CONFIG, assert_same_cache, cfg_option_args, chunk_file, free_port,
                               kitti_cfg_options, make_kitti_like, make_nuscenes_like, nus_cfg_options,
                               save_openmmlab_checkpoint, teacher_checkpoint)

REPO = Path(__file__).resolve().parent.parent
TEST_CONFIGS = REPO / "tests" / "configs"
CACHE_LAYERS = "pts_middle_encoder,pts_neck"  # what the shared reference cache (conftest) holds


#: What mmengine logs as it builds a dataset, the first step of a teacher's set-up.
DATASET_BUILT = "The length of "


def assert_refused_before_set_up(result: subprocess.CompletedProcess, where: str = "") -> None:
    """A featcache command (run with its output captured) stopped before it built the teacher's dataset,
    let alone the model: the evidence is in what it logged, not in how long it took."""
    output = result.stdout + result.stderr
    assert DATASET_BUILT not in output, (where, output[-3000:])


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, options: str):
    """A tmpfs mounted at ``mount_point`` (created) with mount ``options`` (e.g. ``size=12m`` for a full
    disk, ``ro,size=1m`` for a read-only one: root writes anywhere a mode allows), unmounted afterwards."""
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
