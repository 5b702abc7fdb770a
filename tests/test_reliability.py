"""Faults while building and reading: a full disk, readers during a build, repeated kill -9
(tools/torture_build.py), a 2-rank build losing a rank, truncated chunks, damaged manifests."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import codecs, format, models, store
from featcache.errors import CacheFormatError, CorruptSampleError, SampleNotCachedError
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import PILLAR_CONFIG, REPO, assert_same_cache, cfg_option_args, chunk_file, nus_cfg_options

sys.path.insert(0, str(REPO / "tools"))
import torture_build  # noqa: E402  (its launch / kill helpers for torchrun builds)

FEATCACHE = [sys.executable, "-m", "featcache.cli"]
NOAUG = str(REPO / "tests" / "configs" / "pillar_half_noaug.py")


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


# -- a 2-rank build killed mid-build ---------------------------------------------------------
def _wait_for_complete(out: Path, count: int, build: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while torture_build.completed(out) < count:
        assert build.poll() is None, f"the build ended (exit {build.returncode}) before {count} samples were complete"
        assert time.monotonic() < deadline, f"fewer than {count} samples complete after 300 s"
        time.sleep(0.05)


def test_two_rank_build_killed_mid_build_resumes_on_one_rank_then_two(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "cache"
    # same intra-op thread count as the in-process reference: CPU conv sums depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}

    def start(nproc: int) -> subprocess.Popen:
        return torture_build.launch(torture_build.build_command(nus_six, pillar_ckpt, out, nproc), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    two_ranks = start(2)
    _wait_for_complete(out, 2, two_ranks)  # row 0 (rank 0 writes it creating the cache) and one more
    assert torture_build.kill_build(two_ranks, rank=1).startswith("rank 1 of 2")
    after_rank_kill = torture_build.completed(out)
    assert 2 <= after_rank_kill < 6, "the kill should land mid-build"
    report = verify_cache(str(out))
    assert report.complete == after_rank_kill and not report.corrupt  # what was recorded is intact

    one_process = start(1)  # rows are dealt by rank at run time, so another world size resumes too
    _wait_for_complete(out, after_rank_kill + 1, one_process)
    assert torture_build.kill_build(one_process) == "the builder"
    after_process_kill = torture_build.completed(out)
    assert after_rank_kill < after_process_kill < 6
    report = verify_cache(str(out))
    assert report.complete == after_process_kill and not report.corrupt

    resumed = subprocess.run(torture_build.build_command(nus_six, pillar_ckpt, out, 2), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    written_by_rank = [int(count) for count in re.findall(r"wrote (\d+) samples", resumed.stdout)]
    assert len(written_by_rank) == 2 and sum(written_by_rank) == 6 - after_process_kill  # nothing recomputed
    assert verify_cache(str(out)).ok
    assert_same_cache(out, reference_cache)


# -- damaged chunks and manifests --------------------------------------------------------------
def _tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _train_dataset_with_cache(data: Path, cache: Path):
    """The pillar student's un-augmented train pipeline, packing with the cache as `featcache train` does."""
    import trainer.transforms  # noqa: F401  (registers PackDetInputsWithCache)

    cfg = models.load_config(NOAUG, {"train_dataloader.dataset.data_root": f"{data}/",
                                     "train_dataloader.dataset.ann_file": "infos.pkl"})
    dataset_cfg = models.unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    pipeline = list(dataset_cfg.pipeline)
    assert pipeline[-1]["type"] == "Pack3DDetInputs"
    pipeline[-1] = dict(pipeline[-1], type="PackDetInputsWithCache", cache=str(cache))
    dataset_cfg.pipeline = pipeline
    return models.build_dataset(dataset_cfg)


def test_truncated_chunk_is_named_by_verify_and_every_reader(reference_cache, nus_six, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(reference_cache, out)
    cache = open_cache(out)
    bad_row, bad_key = 2, cache.keys[2]
    cut = chunk_file(out, "pts_neck.0", bad_row)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])

    cli = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "5/6 samples verified" in cli.stdout
    corrupt_lines = [line for line in cli.stdout.splitlines() if line.startswith("corrupt ")]
    assert len(corrupt_lines) == 1 and bad_key in corrupt_lines[0] and "pts_neck.0" in corrupt_lines[0]

    names_the_sample = f"{bad_key}.*pts_neck.0.*featcache verify --repair"
    with pytest.raises(CorruptSampleError, match=names_the_sample):
        cache[bad_key]
    from featcache.reader import CachedTargetsDataset

    paired = CachedTargetsDataset(models.build_dataset(models.dataset_cfg_for_split(
        models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_six)), "train")), cache, layers=["pts_neck.0"])
    with pytest.raises(CorruptSampleError, match=names_the_sample):
        paired[bad_row]
    packed = _train_dataset_with_cache(nus_six, out)
    with pytest.raises(CorruptSampleError, match=names_the_sample):
        packed[bad_row]

    reference = open_cache(reference_cache)  # the other samples are untouched and still read
    for row, key in enumerate(cache.keys):
        if row == bad_row:
            continue
        expected = reference[key]
        assert all(torch.equal(value, expected[name]) for name, value in cache[key].items()), key
        assert torch.equal(paired[row][1]["pts_neck.0"], expected["pts_neck.0"]), key
        item = packed[row]["data_samples"]
        assert item.metainfo["cache_key"] == key
        # the pipeline hands out stored values; CacheDistiller decodes them on the training device
        layer = cache.manifest.layer("pts_neck.0")
        decoded = codecs.decode_tensor(item.cached_targets.pts_neck__0, layer.codec,
                                       item.cached_targets.get("pts_neck__0__qparams"))
        assert torch.equal(decoded, expected["pts_neck.0"]), key


def _garbage_in_the_manifest(zarr_json: Path) -> str:
    text = zarr_json.read_bytes()
    start, garbage = text.index(b'"teacher_config"'), b"\xff\xfe\x00{garbage:"
    zarr_json.write_bytes(text[:start] + garbage + text[start + len(garbage):])
    return "zarr.json, which holds the manifest) is damaged"


def _manifest_without_dataset_id(zarr_json: Path) -> str:
    metadata = json.loads(zarr_json.read_text())
    del metadata["attributes"]["featcache"]["dataset_id"]
    zarr_json.write_text(json.dumps(metadata))
    return "damaged manifest (required field 'dataset_id' is missing)"


@pytest.mark.parametrize("damage", [_garbage_in_the_manifest, _manifest_without_dataset_id],
                         ids=["garbage-bytes", "field-removed"])
def test_damaged_manifest_is_refused_by_name_and_nothing_is_lost(damage, reference_cache, nus_six, pillar_ckpt,
                                                                  tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(reference_cache, out)
    original = (out / "zarr.json").read_bytes()
    problem = damage(out / "zarr.json")
    damaged = _tree_digest(out)

    cli = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
    assert f"CacheFormatError: {out}" in cli.stderr and problem in cli.stderr
    with pytest.raises(CacheFormatError, match=re.escape(problem)):
        open_cache(out)
    from trainer.transforms import PackDetInputsWithCache

    with pytest.raises(CacheFormatError, match=re.escape(problem)):
        PackDetInputsWithCache(cache=str(out), keys=["points"])
    # resuming the build refuses too, rather than taking the cache for absent and starting over
    build = subprocess.run(torture_build.build_command(nus_six, pillar_ckpt, out), capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 1 and "Traceback" not in build.stderr, build.stderr[-3000:]
    assert problem in build.stderr

    assert _tree_digest(out) == damaged  # nothing was rewritten or erased
    (out / "zarr.json").write_bytes(original)
    assert verify_cache(str(out)).ok
    assert_same_cache(out, reference_cache)
