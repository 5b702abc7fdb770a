"""Faults while building and reading: a full disk, readers during a build, repeated kill -9
(tools/torture_build.py), a 2-rank build losing a rank, truncated chunks, damaged manifests; and the
user's mistakes: `--out` at a directory featcache did not create or at a file, a manifest lost next to
recorded samples, an export over an existing file, and info lists reordered or edited under a cache
(a sample's key is its identity)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import codecs, format, store
from featcache.teacher import models
from featcache.teacher.samples import check_sources, source_prefix_difference
from featcache.errors import CacheFormatError, CorruptSampleError, SampleNotCachedError
from featcache.reader import open_cache
from featcache.verify import verify_cache
from lidar_fixtures import (PILLAR_CONFIG, REPO, assert_refused_before_set_up, assert_same_cache, cfg_option_args,
                            chunk_file, mounted_tmpfs, nus_cfg_options)

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
    with mounted_tmpfs(tmp_path / "small_fs", "size=12m") as mount_point:
        yield mount_point


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


# `featcache build` held at one moment of one sample's write: its layer's chunk stored, its record not yet written.
# The build signals `paused` in the folder given and waits there for `resume` (files: events, not a clock).
HELD_BUILD = """
import sys, time
from pathlib import Path
from featcache import format, writer
from featcache.cli import main

held_row, signals = int(sys.argv[1]), Path(sys.argv[2])
writing = []
write_sample, checksum = writer.CacheWriter.write_sample, format.checksum

def writing_sample(self, row, *args, **kwargs):
    writing.append(row)
    return write_sample(self, row, *args, **kwargs)

def held_checksum(*arrays, **kwargs):  # called once a layer's chunk is stored, before the sample's record
    if writing and writing[-1] == held_row and not (signals / "resume").exists():
        (signals / "paused").touch()
        while not (signals / "resume").exists():
            time.sleep(0.01)
    return checksum(*arrays, **kwargs)

writer.CacheWriter.write_sample, format.checksum = writing_sample, held_checksum
sys.argv = ["featcache", *sys.argv[3:]]
main()
"""


def test_reader_during_a_build_sees_only_complete_samples(nus_six, pillar_ckpt, tmp_path):
    out, signals, held_row = tmp_path / "cache", tmp_path / "signals", 2
    signals.mkdir()
    build_args = _build_args(nus_six, pillar_ckpt, out)[len(FEATCACHE):]
    log = tmp_path / "build.log"  # a file, not a pipe nobody reads while the build runs
    with open(log, "w") as stderr:
        builder = subprocess.Popen([sys.executable, "-c", HELD_BUILD, str(held_row), str(signals), *build_args],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while not (signals / "paused").exists():  # the build holds row 2 between its chunk and its record
            assert builder.poll() is None, f"the build ended before row {held_row}: {log.read_text()[-2000:]}"
            time.sleep(0.05)
        # rows are written in order (one process): rows 0 and 1 complete, row 2's chunk on disk without its record
        assert chunk_file(out, "pts_neck.0", held_row).stat().st_size > 0
        cache = open_cache(out)
        for row, key in enumerate(cache.row_keys):
            if row < held_row:
                features = cache.read(key)
                assert np.isfinite(features["pts_neck.0"]).all() and features["pts_neck.0"].any(), key
            else:  # never a partial sample: the record, written last, says whether a sample is there
                with pytest.raises(SampleNotCachedError):
                    cache.read(key)
    finally:
        (signals / "resume").touch()
    assert builder.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert verify_cache(str(out)).ok
    cache = open_cache(out)
    assert all(cache.read(key)["pts_neck.0"].any() for key in cache.row_keys)


@pytest.mark.slow
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


@pytest.mark.slow
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
    bad_row, bad_key = 2, cache.row_keys[2]
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
    from featcache.teacher.paired import CachedTargetsDataset

    paired = CachedTargetsDataset(models.build_dataset(models.dataset_cfg_for_split(
        models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_six)), "train")), cache, layers=["pts_neck.0"])
    with pytest.raises(CorruptSampleError, match=names_the_sample):
        paired[bad_row]
    packed = _train_dataset_with_cache(nus_six, out)
    with pytest.raises(CorruptSampleError, match=names_the_sample):
        packed[bad_row]

    reference = open_cache(reference_cache)  # the other samples are untouched and still read
    for row, key in enumerate(cache.row_keys):
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


# -- featcache never destroys what it did not write ---------------------------------------------
def _user_files(root: Path) -> dict[str, bytes]:
    """Files of the user's around a cache: notes, another cache-like directory, a nested result."""
    files = {"notes.txt": b"experiment log\n", "other_cache/zarr.json": b'{"zarr_format": 3, "node_type": "group"}',
             "other_cache/keys/c/0": os.urandom(64), "results/run1/metrics.json": b'{"map": 0.61}'}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _assert_files_intact(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (root / name).read_bytes() == data, name


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_build_into_a_directory_featcache_did_not_create_is_refused(nus_one, pillar_ckpt, small_cache, tmp_path,
                                                                   force):
    experiments = tmp_path / "experiments"  # `--out ~/experiments` instead of `~/experiments/cache1`
    experiments.mkdir()
    files = _user_files(experiments)
    shutil.copytree(small_cache, experiments / "cache1")
    before = _tree_digest(experiments)
    build = subprocess.run(_build_args(nus_one, pillar_ckpt, experiments) + (["--force"] if force else []),
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 1 and "Traceback" not in build.stderr, build.stderr[-3000:]
    assert "NotACacheError" in build.stderr and "is not a featcache cache" in build.stderr
    assert "cache1, notes.txt, other_cache, results" in build.stderr  # a few of its entries, by name
    assert f"--out {experiments / 'cache'}" in build.stderr  # what to do instead
    assert_refused_before_set_up(build)
    assert _tree_digest(experiments) == before  # byte for byte, the other cache included
    _assert_files_intact(experiments, files)
    assert verify_cache(str(experiments / "cache1")).ok


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, nus_one, pillar_ckpt) -> Path:
    """A one-sample, one-layer cache of the real scan."""
    from featcache.teacher.build import BuildOptions, build_cache

    out = tmp_path_factory.mktemp("small") / "cache"
    build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck",
                             cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False))
    return out


def test_force_rebuilds_a_featcache_cache_and_keeps_the_users_files(nus_one, pillar_ckpt, small_cache, tmp_path):
    from featcache.teacher.build import BuildOptions, build_cache

    experiments = tmp_path / "experiments"
    experiments.mkdir()
    around = _user_files(experiments)
    cache = experiments / "cache1"
    shutil.copytree(small_cache, cache)
    inside = {"README.mine": b"do not delete\n", "plots/bev.png": os.urandom(256)}
    for name, data in inside.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(data)
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(cache), layers="pts_neck",
                                      cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False, force=True))
    assert result.written == 1 and result.already_complete == 0  # rebuilt from scratch
    assert verify_cache(str(cache)).ok
    _assert_files_intact(experiments, around)
    _assert_files_intact(cache, inside)  # --force erases featcache's files only
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        ["featcache.json", "featcache.lock", "zarr.json", "keys", "sources", "records", "features", "qparams",
         "README.mine", "plots"])  # featcache.lock: the writer lock, kept (FORMAT.md, one writer per cache)


@pytest.mark.parametrize("group_file", [b"{}", b'{"zarr_format": 3, "node_type": "group"}',
                                        b'{"zarr_format": 3, "node_type": "group", "attributes": {}}', None],
                         ids=["empty-object", "no-attributes", "empty-attributes", "deleted"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "before-markers"])
def test_manifest_lost_next_to_recorded_samples_is_damage_not_a_fresh_start(reference_cache, nus_six, pillar_ckpt,
                                                                            tmp_path, group_file, marked):
    out = tmp_path / "lost_manifest"
    shutil.copytree(reference_cache, out)
    original = (out / "zarr.json").read_bytes()
    if group_file is None:
        (out / "zarr.json").unlink()
        problem = "zarr.json (the group metadata, which holds the manifest) is missing while records/ holds"
    else:
        (out / "zarr.json").write_bytes(group_file)
        problem = "zarr.json parses but holds no featcache manifest, while records/ holds recorded samples"
    if not marked:  # a cache written before the creation marker
        (out / "featcache.json").unlink()
    files = _user_files(tmp_path)
    damaged = _tree_digest(out)

    build = subprocess.run(torture_build.build_command(nus_six, pillar_ckpt, out), capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 1 and "Traceback" not in build.stderr, build.stderr[-3000:]
    assert problem in build.stderr and "Restore zarr.json from a copy" in build.stderr
    with pytest.raises(CacheFormatError, match=re.escape(problem)):
        open_cache(out)
    if not marked:  # --force erases only a cache featcache can tell it wrote
        forced = subprocess.run(torture_build.build_command(nus_six, pillar_ckpt, out) + ["--force"],
                                capture_output=True, text=True, timeout=600)
        assert forced.returncode == 1 and problem in forced.stderr and f"delete {out} yourself" in forced.stderr

    assert _tree_digest(out) == damaged  # nothing was rewritten or erased
    _assert_files_intact(tmp_path, files)
    (out / "zarr.json").write_bytes(original)
    assert verify_cache(str(out)).ok
    assert_same_cache(out, reference_cache)


def test_interrupted_creation_is_redone_only_where_featcache_marked_it(nus_one, pillar_ckpt, tmp_path):
    import zarr

    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.errors import NotACacheError

    def options(out: Path) -> BuildOptions:
        return BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck",
                            cfg_options=nus_cfg_options(nus_one), num_workers=0, progress=False)

    marked, unmarked = tmp_path / "marked", tmp_path / "unmarked"
    for out in (marked, unmarked):  # what a creation leaves before its manifest: a group and some arrays
        zarr.open_group(str(out), mode="w", zarr_format=3).create_array("keys", shape=(1,), dtype=str)
        (out / "mine.txt").write_bytes(b"a file of the user's")
    (marked / "featcache.json").write_text(json.dumps({"format": "featcache"}))
    assert not store.exists(marked) and not store.exists(unmarked)
    assert build_cache(options(marked)).written == 1 and verify_cache(str(marked)).ok
    assert (marked / "mine.txt").read_bytes() == b"a file of the user's"

    before = _tree_digest(unmarked)  # a Zarr group featcache did not mark may be anyone's
    for force in (False, True):
        with pytest.raises(NotACacheError, match="Zarr group featcache did not create.*keys, mine.txt, zarr.json"):
            build_cache(dataclasses.replace(options(unmarked), force=force))
    assert _tree_digest(unmarked) == before


def test_build_out_at_a_file_is_a_one_line_error(nus_one, pillar_ckpt, tmp_path):
    target = tmp_path / "results.txt"
    target.write_bytes(b"precious")
    for out in (target, target / "cache"):
        build = subprocess.run(_build_args(nus_one, pillar_ckpt, out), capture_output=True, text=True, timeout=600)
        assert build.returncode == 1 and "Traceback" not in build.stderr, build.stderr
        assert len(build.stderr.strip().splitlines()) == 1, build.stderr
        assert "ConfigError" in build.stderr and f"{target} is a file" in build.stderr
    assert target.read_bytes() == b"precious"


def test_export_never_replaces_an_existing_out_unless_told(reference_cache, tmp_path):
    out = tmp_path / "cache.h5"
    out.write_bytes(b"an older export the user keeps")
    export = FEATCACHE + ["export", reference_cache, "--format", "hdf5"]
    refused = subprocess.run(export + [str(out)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"{out}' exists" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_bytes() == b"an older export the user keeps"

    directory = tmp_path / "exports.h5"  # a directory is never replaced, --overwrite or not
    directory.mkdir()
    files = _user_files(directory)
    for extra in ([], ["--overwrite"]):
        result = subprocess.run(export + [str(directory), *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and "is a directory" in result.stderr, result.stderr
    _assert_files_intact(directory, files)
    wrong_suffix = subprocess.run(export + [str(tmp_path / "cache.zarr")], capture_output=True, text=True, timeout=300)
    assert wrong_suffix.returncode == 1 and "must end with .h5 or .hdf5" in wrong_suffix.stderr

    replaced = subprocess.run(export + [str(out), "--overwrite"], capture_output=True, text=True, timeout=300)
    assert replaced.returncode == 0, replaced.stderr
    assert_same_cache(out, reference_cache)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.h5", "exports.h5"]  # no temporary left


# -- a sample's key is its identity -------------------------------------------------------------
def _tokenless(nus_six: Path, root: Path, count: int = 2) -> Path:
    """``count`` frames without tokens (KITTI-like: mmengine's sample_idx is the list position), and the
    same frames in reverse order as ``swapped.pkl``."""
    shutil.copytree(nus_six, root)
    infos = pickle.loads((root / "infos.pkl").read_bytes())
    infos["data_list"] = infos["data_list"][:count]
    for info in infos["data_list"]:
        del info["token"]
        info.pop("sample_idx", None)
    (root / "infos.pkl").write_bytes(pickle.dumps(infos))
    (root / "swapped.pkl").write_bytes(pickle.dumps({**infos, "data_list": infos["data_list"][::-1]}))
    return root


def _ann_file(options: dict, name: str) -> dict:
    return {key: (name if key.endswith("ann_file") else value) for key, value in options.items()}


def _tokenless_cache(nus_six: Path, pillar_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    from featcache.teacher.build import BuildOptions, build_cache

    data = _tokenless(nus_six, tmp_path / "kitti_like")
    out = tmp_path / "cache"
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_neck",
                                      cfg_options=nus_cfg_options(data), num_workers=0, progress=False))
    assert result.written == 2
    return data, out


def test_tokenless_samples_are_keyed_by_their_scan_not_their_position(nus_six, pillar_ckpt, tmp_path):
    from featcache.teacher.paired import CachedTargetsDataset

    data, out = _tokenless_cache(nus_six, pillar_ckpt, tmp_path)
    infos = pickle.loads((data / "infos.pkl").read_bytes())["data_list"]
    scans = [f"samples/LIDAR_TOP/{info['lidar_points']['lidar_path']}" for info in infos]
    cache = open_cache(out)
    assert list(cache.row_keys) == scans and list(cache.sources) == scans
    assert cache.manifest.key_scheme == format.KEY_SCHEME

    # the same two frames, swapped: resuming is refused by name, and the cache is untouched
    before = _tree_digest(out)
    swapped = cfg_option_args(_ann_file(nus_cfg_options(data), "swapped.pkl"))
    resume = subprocess.run(FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", str(out), "--layers",
                                         "pts_neck", "--num-workers", "0", *swapped],
                            capture_output=True, text=True, timeout=600)
    assert resume.returncode == 1 and "Traceback" not in resume.stderr, resume.stderr[-3000:]
    assert "already complete" not in resume.stdout + resume.stderr
    assert f"row 0: cache has {scans[0]!r}, this build has {scans[1]!r}" in resume.stderr
    assert _tree_digest(out) == before

    # readers pair by key, so the swapped list gets each frame's own targets
    inspect = subprocess.run(FEATCACHE + ["inspect", str(out), "--fidelity", "2", *swapped], capture_output=True,
                             text=True, timeout=600)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    cosines = {line.split()[0]: float(line.split("cosine ")[1].split()[0])
               for line in inspect.stdout.splitlines() if "cosine" in line}
    assert set(cosines) == set(scans) and min(cosines.values()) > 0.999, inspect.stdout
    cfg = models.load_config(PILLAR_CONFIG, _ann_file(nus_cfg_options(data), "swapped.pkl"))
    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    paired = CachedTargetsDataset(dataset, cache)
    for index, scan in enumerate(scans[::-1]):
        item, targets = paired[index]
        assert item["data_samples"].metainfo["lidar_path"].endswith(scan)
        assert torch.equal(targets["pts_neck.0"], cache[scan]["pts_neck.0"])


def _with_scans_swapped(source: Path, root: Path) -> Path:
    """The same tokens in the same order, but rows 0 and 1 read each other's lidar file."""
    shutil.copytree(source, root)
    infos = pickle.loads((root / "infos.pkl").read_bytes())
    first, second = infos["data_list"][0]["lidar_points"], infos["data_list"][1]["lidar_points"]
    first["lidar_path"], second["lidar_path"] = second["lidar_path"], first["lidar_path"]
    (root / "infos.pkl").write_bytes(pickle.dumps(infos))
    return root


def test_same_key_on_another_scan_is_refused_by_resume_and_by_readers(reference_cache, nus_six, pillar_ckpt,
                                                                      tmp_path):
    from featcache.errors import CacheMismatchError
    from featcache.teacher.paired import CachedTargetsDataset

    data = _with_scans_swapped(nus_six, tmp_path / "edited")
    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    before = _tree_digest(out)
    cache = open_cache(out)
    token, scan = cache.row_keys[0], cache.sources[0]
    resume = subprocess.run(torture_build.build_command(data, pillar_ckpt, out), capture_output=True, text=True,
                            timeout=600)
    assert resume.returncode == 1 and "Traceback" not in resume.stderr, resume.stderr[-3000:]
    assert f"sample {token!r}: the cache holds {scan}, the dataset reads {cache.sources[1]}" in resume.stderr
    assert _tree_digest(out) == before

    dataset = models.build_dataset(models.dataset_cfg_for_split(
        models.load_config(PILLAR_CONFIG, nus_cfg_options(data)), "train"))
    for check in (lambda: check_sources(cache, dataset), lambda: CachedTargetsDataset(dataset, cache)):
        with pytest.raises(CacheMismatchError, match=f"2 sample.*{token}.*{re.escape(scan)}"):
            check()
    same = models.build_dataset(models.dataset_cfg_for_split(
        models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_six)), "train"))
    assert check_sources(cache, same) == 6


def test_scans_under_another_data_prefix_are_refused_naming_the_prefix(reference_cache, nus_six, tmp_path):
    # the same files, read from a flat data root (data_prefix.pts=''): the cache recorded samples/LIDAR_TOP/...
    from featcache.errors import CacheMismatchError
    from featcache.teacher.paired import CachedTargetsDataset

    flat = tmp_path / "flat"
    flat.mkdir()
    for scan in (nus_six / "samples" / "LIDAR_TOP").iterdir():
        (flat / scan.name).symlink_to(scan)
    shutil.copy(nus_six / "infos.pkl", flat / "infos.pkl")
    cache = open_cache(reference_cache)
    assert all(source.startswith("samples/LIDAR_TOP/") for source in cache.sources)

    def dataset(root, pts):
        options = {**nus_cfg_options(root), "train_dataloader.dataset.dataset.data_prefix.pts": pts}
        return models.build_dataset(models.dataset_cfg_for_split(models.load_config(PILLAR_CONFIG, options), "train"))

    prefix = (r"6 sample\(s\).*The lidar paths differ only by their leading directory: the cache's files are under "
              r"'samples/LIDAR_TOP/', this dataset's directly in the data root \(no prefix\).*data_prefix.pts="
              r"'samples/LIDAR_TOP' \(--cfg-options train_dataloader.dataset.data_prefix.pts=samples/LIDAR_TOP")
    flat_dataset = dataset(flat, "")
    for check in (lambda: check_sources(cache, flat_dataset), lambda: CachedTargetsDataset(flat_dataset, cache)):
        with pytest.raises(CacheMismatchError, match=prefix) as raised:
            check()
        assert "use the info file the cache was built from" not in str(raised.value)
    # the advice: the prefix the cache was built with pairs the same keys with the same paths again
    assert check_sources(cache, dataset(flat, "samples/LIDAR_TOP")) == 6
    # other file names are not a prefix difference
    assert source_prefix_difference(["k"], ["a/x.bin"], ["k"], ["a/y.bin"]) is None
    assert source_prefix_difference(["k", "l"], ["a/x.bin", "b/y.bin"], ["k", "l"], ["x.bin", "y.bin"]) is None
    assert "under 'a/b/', this dataset's under 'c/'" in source_prefix_difference(
        ["k", "l"], ["a/b/x.bin", "a/b/y.bin"], ["k", "l"], ["c/x.bin", "c/y.bin"])


def _as_written_before_identities(out: Path, keys: list[str] | None = None) -> None:
    """Rewrite a cache as featcache wrote it before keys were identities: no marker, no sources, no
    key scheme in the manifest (and, for token-less samples, keys that were list positions)."""
    import zarr

    metadata = json.loads((out / "zarr.json").read_text())
    del metadata["attributes"]["featcache"]["key_scheme"]
    (out / "zarr.json").write_text(json.dumps(metadata))
    shutil.rmtree(out / "sources")
    (out / "featcache.json").unlink()
    if keys is not None:
        zarr.open_array(str(out / "keys"), mode="r+")[:] = np.asarray(keys, dtype=str)


def test_position_keyed_cache_from_before_is_refused_with_rebuild_advice(nus_six, pillar_ckpt, tmp_path):
    data, out = _tokenless_cache(nus_six, pillar_ckpt, tmp_path)
    _as_written_before_identities(out, keys=["0", "1"])
    before = _tree_digest(out)
    advice = "keyed by their position in the info list"
    with pytest.raises(CacheFormatError, match=f"{advice}.*Rebuild it: `featcache build .* --force`"):
        open_cache(out)
    args = FEATCACHE + ["build", PILLAR_CONFIG, str(pillar_ckpt), "--out", str(out), "--layers", "pts_neck",
                        "--num-workers", "0", *cfg_option_args(nus_cfg_options(data))]
    resume = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resume.returncode == 1 and advice in resume.stderr and "Traceback" not in resume.stderr, resume.stderr
    assert _tree_digest(out) == before
    rebuilt = subprocess.run(args + ["--force"], capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert open_cache(out).row_keys[0].startswith("samples/LIDAR_TOP/") and verify_cache(str(out)).ok


def test_token_keyed_cache_from_before_still_reads_and_resumes(reference_cache, nus_six, pillar_ckpt, tmp_path):
    from featcache.teacher.build import BuildOptions, build_cache

    out = tmp_path / "older"
    shutil.copytree(reference_cache, out)
    _as_written_before_identities(out)
    cache, reference = open_cache(out), open_cache(reference_cache)
    assert cache.row_keys == reference.row_keys and cache.sources is None
    dataset = models.build_dataset(models.dataset_cfg_for_split(
        models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_six)), "train"))
    assert check_sources(cache, dataset) == 0  # nothing recorded to compare
    result = build_cache(BuildOptions(PILLAR_CONFIG, str(pillar_ckpt), str(out), layers="pts_middle_encoder,pts_neck",
                                      cfg_options=nus_cfg_options(nus_six), num_workers=0, progress=False))
    assert result.written == 0 and result.already_complete == 6
    assert_same_cache(out, reference_cache)
