"""No silent wrong result (issue 28): one writer per cache (two builds at once, a build, --force or
verify --repair beside a running writer), a damaged records row that is that row's damage alone (cut
short, bytes flipped; in caches with and without records crc32c), and a NaN head behind finite boxes."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import format, location
from featcache import lock as cache_lock
from featcache.errors import CacheBusyError, CorruptSampleError
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import (PILLAR_CONFIG, assert_refused_before_set_up, assert_same_cache, cfg_option_args,
                            mounted_tmpfs, nus_cfg_options)

FEATCACHE = [sys.executable, "-m", "featcache.cli"]


def _build_args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return FEATCACHE + ["build", PILLAR_CONFIG, str(ckpt), "--out", str(out), "--layers", "pts_neck",
                        "--num-workers", "0", *cfg_option_args(nus_cfg_options(data)), *extra]


def _same_threads() -> dict[str, str]:
    """A subprocess build comparable with an in-process one: CPU conv sums depend on the thread count."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error: ")]


# -- one writer per cache ------------------------------------------------------------------------
@pytest.mark.parametrize("codecs_in_order", [("int8-zstd3", "fp16-zstd1"), ("fp16-zstd1", "int8-zstd3")],
                         ids=["int8-first", "fp16-first"])
def test_two_builds_at_once_into_one_new_out_one_is_refused(nus_six, pillar_ckpt, tmp_path, codecs_in_order):
    out = tmp_path / "runs" / "cache"  # neither exists yet: the race is at creation
    builds = [subprocess.Popen(_build_args(nus_six, pillar_ckpt, out, "--codec", codec), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for codec in codecs_in_order]
    results = [(build, *build.communicate(timeout=900)) for build in builds]
    refused = [(build, stderr) for build, _, stderr in results if build.returncode != 0]
    finished = [(build, stdout, codec) for (build, stdout, _), codec in zip(results, codecs_in_order)
                if build.returncode == 0]
    assert len(refused) == 1 and len(finished) == 1, [(b.returncode, e[-1500:]) for b, _, e in results]
    (loser, stderr), (winner, stdout, codec) = refused[0], finished[0]
    assert loser.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"Error: CacheBusyError: {out} is being written by featcache build (pid {winner.pid} ")
    assert "nothing was touched" in errors[0]
    assert "wrote 6 samples" in stdout
    cache = open_cache(out)  # the winner's cache, all of it in its own codec
    assert cache.manifest.layer("pts_neck.0").codec.name == codec
    check = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "6/6 samples verified" in check.stdout, check.stdout + check.stderr[-2000:]


def _damage_records_row(out: Path, row: int) -> None:
    chunk = _records_chunk(out, row)
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    data[1] ^= 0x10
    chunk.write_bytes(bytes(data))


def test_a_second_writer_is_refused_by_name_and_touches_nothing(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    _damage_records_row(out, 1)  # so that verify --repair has a sample to rebuild
    with cache_lock.acquire(out, "featcache build") as held:
        assert held.held
        before = _tree_digest(out)
        attempts = {
            "build": _build_args(nus_six, pillar_ckpt, out),
            "force": _build_args(nus_six, pillar_ckpt, out, "--force"),
            "repair": FEATCACHE + ["verify", str(out), "--repair", *cfg_option_args(nus_cfg_options(nus_six))],
        }
        for name, args in attempts.items():
            result = subprocess.run(args, capture_output=True, text=True, timeout=600)
            assert result.returncode == 1 and "Traceback" not in result.stderr, (name, result.stderr[-3000:])
            errors = _error_lines(result.stderr)
            assert len(errors) == 1, (name, result.stderr[-3000:])
            assert f"CacheBusyError: {out} is being written by featcache build (pid {os.getpid()} on " in errors[0]
            assert "Wait for it to finish" in errors[0]
            assert_refused_before_set_up(result, name)
            assert _tree_digest(out) == before, name
        # in this process too: another open file description of the lock file conflicts with the holder's
        from featcache.teacher.build import BuildOptions, build_cache

        with pytest.raises(CacheBusyError, match="being written by featcache build"):
            build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_middle_encoder,pts_neck",
                                     cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
        assert _tree_digest(out) == before
    # the holder gone, the same repair goes through
    repaired = subprocess.run(attempts["repair"], capture_output=True, text=True, timeout=600, env=_same_threads())
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr[-3000:]
    assert "repaired 1 samples" in repaired.stdout and "6/6 samples verified" in repaired.stdout
    assert_same_cache(out, reference_cache)


def test_the_lock_file_alone_is_an_empty_directory_and_force_keeps_it(tmp_path):
    out = tmp_path / "cache"
    with cache_lock.acquire(out):
        assert (out / location.LOCK).is_file()
        assert location.inspect(out).kind == location.EMPTY
        location.erase(out)  # --force's erasing: the lock the next writer may hold stays
        assert (out / location.LOCK).is_file()
    (out / "notes.txt").write_text("mine")
    state = location.inspect(out)
    assert state.kind == location.FOREIGN and state.entries == ("notes.txt",)


def test_erase_takes_every_entry_featcache_writes_and_nothing_else(tmp_path):
    """--force's erasing: every root entry a cache can hold (the teacher boxes included: a rebuild without
    --boxes must not leave an earlier cache's boxes behind), zarr's temp files, never the user's files."""
    out = tmp_path / "cache"
    for name in format.ENTRIES:
        if name.endswith(".json"):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("{}")
        else:
            (out / name / "c").mkdir(parents=True)
            (out / name / "c" / "0").write_bytes(b"chunk")
    (out / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b"")
    (out / "notes.txt").write_text("mine")
    assert {"boxes", "features", "qparams", "records", "keys", "sources"} <= set(format.ENTRIES)
    location.erase(out)
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


@pytest.fixture
def read_only_directory(tmp_path):
    """A read-only filesystem (root writes anywhere a mode allows nothing)."""
    with mounted_tmpfs(tmp_path / "read_only", "ro,size=1m") as mount_point:
        yield mount_point


def test_unwritable_out_is_refused_before_the_teacher_in_one_line(nus_one, pillar_ckpt, read_only_directory):
    out = read_only_directory / "cache"
    result = subprocess.run(_build_args(nus_one, pillar_ckpt, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and f"--out {out}: cannot create the cache there (OSError: " in errors[0], errors
    assert "Read-only file system" in errors[0] and "choose a directory you can write" in errors[0]
    assert_refused_before_set_up(result)
    assert list(read_only_directory.iterdir()) == []


# -- a damaged records row is that row's damage alone ----------------------------------------------
def _records_chunk(out: Path, row: int) -> Path:
    files = [path for path in (out / "records" / "c" / str(row)).rglob("*") if path.is_file()]
    assert len(files) == 1, files
    return files[0]


def _cut_short(chunk: Path) -> None:
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _flip_two_bytes(chunk: Path) -> None:
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF  # the status
    data[5] ^= 0x01  # a checksum
    chunk.write_bytes(bytes(data))


def _as_records_without_crc(out: Path) -> None:
    """Rewrite ``records`` as featcache wrote it before records chunks carried a crc32c."""
    import zarr

    group = zarr.open_group(str(out), mode="r+", zarr_format=3)
    rows = np.asarray(group[format.RECORDS_ARRAY][:])
    shutil.rmtree(out / "records")
    group = zarr.open_group(str(out), mode="r+", zarr_format=3)
    group.create_array(format.RECORDS_ARRAY, shape=rows.shape, chunks=(1, rows.shape[1]), dtype=np.uint32,
                       fill_value=0, compressors=None)[:] = rows


@pytest.mark.parametrize("records_crc", [True, False], ids=["records-crc", "written-before-records-crc"])
@pytest.mark.parametrize("damage", [_cut_short, _flip_two_bytes], ids=["cut-short", "bytes-flipped"])
def test_damaged_records_row_is_named_repaired_and_resumed_around(reference_cache, nus_six, pillar_ckpt, tmp_path,
                                                                  damage, records_crc):
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.codecs import has_chunk_checksum

    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    import zarr

    assert has_chunk_checksum(zarr.open_array(str(out / "records"), mode="r").metadata)
    if not records_crc:
        _as_records_without_crc(out)
        assert verify_cache(str(out)).ok  # caches written before read and verify as before
    cache = open_cache(out)
    bad_row, bad_key = 2, cache.row_keys[2]
    damage(_records_chunk(out, bad_row))

    status = cache.status()  # one damaged row, the others as they were
    assert status[bad_row] == format.STATUS_DAMAGED
    assert all(status[row] == format.STATUS_COMPLETE for row in range(6) if row != bad_row)
    with pytest.raises(CorruptSampleError, match=f"{bad_key}.*records row.*featcache verify --repair"):
        cache[bad_key]
    reference = open_cache(reference_cache)
    for row, key in enumerate(cache.row_keys):
        if row != bad_row:
            assert all(torch.equal(value, reference[key][name]) for name, value in cache[key].items()), key

    check = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=600)
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr[-3000:]
    assert "5/6 samples verified" in check.stdout
    corrupt = [line for line in check.stdout.splitlines() if line.startswith("corrupt ")]
    assert len(corrupt) == 1 and bad_key in corrupt[0] and "records row is damaged" in corrupt[0], check.stdout
    described = subprocess.run(FEATCACHE + ["inspect", str(out)], capture_output=True, text=True, timeout=600)
    assert described.returncode == 0, described.stderr[-3000:]
    assert "5/6 complete, 0 invalid, 0 missing, 1 damaged" in described.stdout

    # a resumed build rebuilds that row and nothing else
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_middle_encoder,pts_neck",
                                      cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    assert result.written == 1 and result.already_complete == 5 and result.invalid_keys == []
    assert verify_cache(str(out)).ok
    assert_same_cache(out, reference_cache)

    # and verify --repair does as well, with the build's --cfg-options from the manifest (none given here)
    damage(_records_chunk(out, bad_row))
    repaired = subprocess.run(FEATCACHE + ["verify", str(out), "--repair"], capture_output=True, text=True,
                              timeout=600, env=_same_threads())
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr[-3000:]
    assert "repaired 1 samples" in repaired.stdout and repaired.stdout.rstrip().endswith("6/6 samples verified")
    assert_same_cache(out, reference_cache)
    assert has_chunk_checksum(zarr.open_array(str(out / "records"), mode="r").metadata) == records_crc


# -- a NaN head behind finite boxes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_heatmap_ckpt(tmp_path_factory, pillar_ckpt) -> Path:
    """The pillar teacher with its task-0 (car) heatmap's last convolution weight NaN."""
    from featcache.teacher import models
    from lidar_fixtures import save_openmmlab_checkpoint

    model = models.build_model(models.load_config(PILLAR_CONFIG), str(pillar_ckpt))
    with torch.no_grad():
        model.pts_bbox_head.task_heads[0].heatmap[-1].weight.fill_(float("nan"))
    return save_openmmlab_checkpoint(model, tmp_path_factory.mktemp("nan_head") / "teacher_nan_heatmap.pth")


def test_nan_head_with_only_boxes_cached_makes_the_sample_invalid(nus_one, nan_heatmap_ckpt, tmp_path):
    out = tmp_path / "cache"
    result = subprocess.run(_build_args(nus_one, nan_heatmap_ckpt, out, "--boxes"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    cache = open_cache(out)
    key = cache.row_keys[0]
    assert _error_lines(result.stderr) == [f"Error: 1 samples had non-finite teacher output and were not cached: {key}"]
    assert (f"sample {key!r}: teacher output not finite (non-finite head outputs (the boxes are decoded from "
            "them):") in result.stderr and "pts_bbox_head output" in result.stderr
    assert cache.status()[0] == format.STATUS_INVALID
    assert not cache._open().attrs.get(format.NONZERO_ATTRIBUTE)  # statistics of valid samples only: none
    check = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True, timeout=600)
    assert check.returncode == 1 and f"1 invalid (non-finite teacher output): {key}" in check.stdout
