"""`featcache build` / reader / verify / inspect / export on real CenterPoint teachers.

Teachers are mmdet3d's CenterPoint configs with seeded random weights saved as real mmengine
checkpoints; data is the real nuScenes scan plus rigidly transformed copies of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from zarr import codecs as zarr_codecs

from featcache import codecs, format, store
from featcache.teacher import models
from featcache.teacher.build import BuildOptions, build_cache
from featcache.errors import CacheMismatchError, CorruptSampleError, SampleNotCachedError
from featcache.reader import open_cache
from featcache.teacher.detector import Teacher
from featcache.verify import verify_cache
from lidar_fixtures import (CACHE_LAYERS, PILLAR_CONFIG, VOXEL_CONFIG, assert_same_cache, cfg_option_args, chunk_file,
                            free_port, nus_cfg_options, save_openmmlab_checkpoint, teacher_checkpoint)

LAYERS = CACHE_LAYERS
FEATCACHE = [sys.executable, "-m", "featcache.cli"]


@pytest.fixture(scope="session")
def other_pillar_ckpt(tmp_path_factory) -> Path:
    return teacher_checkpoint(tmp_path_factory.mktemp("ckpt"), PILLAR_CONFIG, seed=1)


def _options(data_root: Path, ckpt: Path, out: Path | str, **overrides) -> BuildOptions:
    values = dict(teacher_config=PILLAR_CONFIG, checkpoint=str(ckpt), out=str(out), layers=LAYERS,
                  cfg_options=nus_cfg_options(data_root), num_workers=0, progress=False)
    values.update(overrides)
    return BuildOptions(**values)


def _cli_args(data_root: Path, ckpt: Path, out: Path | str, *extra: str) -> list[str]:
    return (["build", PILLAR_CONFIG, str(ckpt), "--out", str(out), "--layers", LAYERS, "--num-workers", "0"]
            + cfg_option_args(nus_cfg_options(data_root)) + list(extra))


# -- codecs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, bound", [("fp32-none", 0.0), ("fp16-zstd1", 1e-3), ("bf16-zstd3", 8e-3),
                                         ("int8-lz4", None)])
def test_codec_round_trip_within_bound(name, bound):
    rng = np.random.default_rng(0)
    scales = np.logspace(-4, 2, 16, dtype=np.float32)[:, None, None]
    features = np.maximum(rng.normal(size=(16, 20, 20)).astype(np.float32), 0) * scales
    codec = codecs.parse_codec(name)
    stored, qparams = codecs.encode(features, codec)
    decoded = codecs.decode(stored, codec, qparams)
    error = np.abs(decoded - features)
    if name == "int8-lz4":  # per-channel: half a quantisation step of that channel's range
        step = (features.max(axis=(1, 2)) - features.min(axis=(1, 2))) / 255
        assert (error.max(axis=(1, 2)) <= step / 2 * 1.001 + 1e-12).all()
    else:
        assert (error <= bound * np.abs(features) + 1e-7).all()


@pytest.mark.parametrize("name", ["fp32-none", "fp16-zstd1", "bf16-zstd3", "int8-zstd3"])
def test_decode_tensor_equals_numpy_decode_batched_or_not(name):
    codec = codecs.parse_codec(name)
    maps = np.random.default_rng(1).standard_normal((3, 4, 5, 6)).astype(np.float32) * [[[[1.0]]], [[[10]]], [[[0.1]]]]
    encoded = [codecs.encode(value, codec) for value in maps]
    expected = np.stack([codecs.decode(stored, codec, qparams) for stored, qparams in encoded])
    stored = torch.from_numpy(np.stack([stored for stored, _ in encoded]))
    qparams = torch.from_numpy(np.stack([q for _, q in encoded])) if codec.precision == "int8" else None
    assert torch.equal(codecs.decode_tensor(stored, codec, qparams), torch.from_numpy(expected))
    single = codecs.decode_tensor(stored[1], codec, None if qparams is None else qparams[1])
    assert torch.equal(single, torch.from_numpy(expected[1]))


@pytest.mark.parametrize("name", ["score8-zstd3", "asin8-zstd3"])
def test_score_codecs_keep_heatmap_scores_on_their_grid(name):
    # logits of a trained head's range (background near -9, peaks near +6) and beyond it
    logits = np.linspace(-30, 30, 6000, dtype=np.float32).reshape(1, 3, 2000)
    codec = codecs.parse_codec(name)
    stored, qparams = codecs.encode(logits, codec)
    assert stored.dtype == np.uint8 and qparams is None and not codec.linear and codec.stores_scores
    decoded = codecs.decode(stored, codec)
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    # what the terms compare: clamped scores (CenterHead's 1e-4 clamp), error within the grid's half step
    clamped = np.clip(scores, codecs.SCORE8_FLOOR, 1 - codecs.SCORE8_FLOOR)
    error = np.abs(1 / (1 + np.exp(-decoded.astype(np.float64))) - clamped)
    if name == "score8-zstd3":
        assert error.max() <= 1 / 510 + 1e-6
    else:  # arcsine-root grid: |ds| <= sin(2 theta) * pi / 1020, finest at both ends
        assert error.max() <= np.pi / 1020 + 1e-6
        near_ends = (clamped > 1e-3) & (clamped < 1e-2) | (clamped > 0.99) & (clamped < 0.999)
        bound = 2 * np.sqrt(clamped * (1 - clamped)) * np.pi / 1020 * 1.05 + 1e-6
        assert (error[near_ends] <= bound[near_ends]).all()
        assert (error[near_ends] < 1 / 510 / 2).all()  # below score8's half step there
    torch.testing.assert_close(codecs.decode_tensor(torch.from_numpy(stored), codec), torch.from_numpy(decoded),
                               rtol=1e-5, atol=1e-4)


def test_codec_option_parsing_names_the_problem():
    chosen = codecs.CodecOption.parse("pts_neck=int8-zstd3").choose(["pts_middle_encoder", "pts_neck.0"])
    assert chosen["pts_neck.0"].name == "int8-zstd3" and chosen["pts_middle_encoder"] == codecs.DEFAULT_CODEC
    with pytest.raises(ValueError, match="pts_head.*not recorded"):
        codecs.CodecOption.parse("pts_head=fp32-none").choose(["pts_neck.0"])
    with pytest.raises(ValueError, match="fp12-zstd.*precision.*fp32, fp16, bf16, int8"):
        codecs.parse_codec("fp12-zstd")
    # --codec and --bev-layout share one LAYER=VALUE syntax (featcache.selectors): a layer named twice is refused
    with pytest.raises(ValueError, match="--codec names layer 'pts_neck' twice; give each layer once"):
        codecs.CodecOption.parse("pts_neck=fp16-zstd1,pts_neck=int8-zstd3")
    with pytest.raises(ValueError, match="--codec item 'pts_backbone' is not LAYER=CODEC .*--codec fp16-zstd1"):
        codecs.CodecOption.parse("pts_neck=fp16-zstd1,pts_backbone")
    # head outputs can be named by kind: every task's heatmap at once
    names = ["pts_neck.0", "head.task_heads.0.heatmap", "head.task_heads.1.heatmap", "head.task_heads.0.reg"]
    kinds = {names[1]: "heatmap", names[2]: "heatmap", names[3]: "reg"}
    chosen = codecs.CodecOption.parse("heatmap=asin8-zstd3").choose(names, kinds=kinds)
    assert [chosen[name].name for name in names] == [codecs.DEFAULT_CODEC.name, "asin8-zstd3", "asin8-zstd3",
                                                     codecs.DEFAULT_CODEC.name]
    with pytest.raises(ValueError, match="'vel', which is not recorded.*head output kind: heatmap, reg"):
        codecs.CodecOption.parse("vel=fp16-zstd1").choose(names, kinds=kinds)


# -- build and read back ---------------------------------------------------------------------
def test_fp32_cache_is_bit_exact_with_live_teacher(tmp_path, nus_six, pillar_ckpt):
    out = tmp_path / "fp32"
    build_cache(_options(nus_six, pillar_ckpt, out, codec="fp32-none", batch_size=2))
    cache = open_cache(out)
    teacher = Teacher(PILLAR_CONFIG, str(pillar_ckpt), LAYERS, cfg_options=nus_cfg_options(nus_six))
    assert list(cache.row_keys) == teacher.keys
    for row in (0, 3, 5):
        live = teacher.features_of_row(row)
        cached = cache[cache.row_keys[row]]
        assert set(cached) == {"pts_middle_encoder", "pts_neck.0"}
        for name, value in live.items():
            assert torch.equal(cached[name], torch.from_numpy(value)), name
            assert value.std() > 0


def assert_within_int8_step(cached: np.ndarray, live: np.ndarray, name: str) -> None:
    """int8 per channel: every value within half a quantisation step of its channel's range."""
    per_channel = live.reshape(live.shape[0], -1)
    step = (per_channel.max(axis=1) - per_channel.min(axis=1)) / 255.0
    error = np.abs(cached - live).reshape(live.shape[0], -1).max(axis=1)
    assert (error <= 0.5 * step * (1 + 1e-4) + 1e-6).all(), (name, float((error / np.maximum(step, 1e-12)).max()))


def test_default_codec_is_close_to_teacher_and_smaller(reference_cache, nus_six, pillar_ckpt):
    cache = open_cache(reference_cache)
    assert {layer.codec.name for layer in cache.manifest.layers} == {codecs.DEFAULT_CODEC.name} == {"int8-zstd3"}
    teacher = Teacher(PILLAR_CONFIG, str(pillar_ckpt), LAYERS, cfg_options=nus_cfg_options(nus_six))
    live = teacher.features_of_row(2)
    cached = cache.read(cache.row_keys[2])
    for name, value in live.items():
        assert_within_int8_step(cached[name], value, name)
    from featcache.inspection import layer_summaries

    for summary in layer_summaries(cache, [0, 1]):
        assert summary.ratio > 4.0, summary  # uint8 alone is 4x; zstd removes the empty BEV cells


def test_manifest_records_identity_and_provenance(reference_cache, pillar_ckpt):
    manifest = open_cache(reference_cache).manifest
    assert manifest.checkpoint_sha256 == format.sha256_file(str(pillar_ckpt))
    assert manifest.split == "train" and manifest.num_samples == 6
    assert "PointPillarsScatter" in manifest.teacher_config
    assert [step["type"] for step in manifest.pipeline][0] == "LoadPointsFromFile"
    assert {"torch", "mmdet3d", "zarr"} <= set(manifest.versions)
    assert manifest.layer("pts_neck.0").shape == (384, 128, 128)
    assert manifest.layer("pts_neck.0").module == "pts_neck" and manifest.layer("pts_neck.0").index == 0


def test_rerun_resumes_without_recomputing(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_cache, out)
    result = build_cache(_options(nus_six, pillar_ckpt, out))
    assert result.written == 0 and result.already_complete == 6


def test_other_checkpoint_is_refused_and_force_starts_over(reference_cache, nus_six, other_pillar_ckpt, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference_cache, out)
    with pytest.raises(CacheMismatchError, match="(?s)checkpoint_sha256.*--force"):
        build_cache(_options(nus_six, other_pillar_ckpt, out))
    with pytest.raises(CacheMismatchError, match="layers"):
        build_cache(_options(nus_six, other_pillar_ckpt, out, codec="fp16-zstd1"))
    assert verify_cache(str(out)).ok  # the refused runs changed nothing
    result = build_cache(_options(nus_six, other_pillar_ckpt, out, force=True))
    assert result.written == 6
    cache = open_cache(out)
    assert cache.manifest.checkpoint_sha256 == format.sha256_file(str(other_pillar_ckpt))
    # the build's stored bytes are the chunks inspect counts, the int8 scale chunks included
    from featcache.inspection import stored_bytes_per_sample

    scales = [layer.qparams_array for layer in cache.manifest.layers if layer.qparams_array is not None]
    assert scales and stored_bytes_per_sample(cache, scales, range(6)) > 0
    arrays = [array for layer in cache.manifest.layers for array in layer.arrays()]  # no boxes here; records aside
    assert result.stored_bytes == round(6 * stored_bytes_per_sample(cache, arrays, range(6)))


def test_kill_9_mid_build_then_resume_equals_uninterrupted(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(FEATCACHE + _cli_args(nus_six, pillar_ckpt, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if store.exists(out):  # the manifest is there: the cache has all its arrays
            done = int((open_cache(out).status() == format.STATUS_COMPLETE).sum())
            if done >= 2:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    status = open_cache(out).status()
    assert 2 <= int((status == format.STATUS_COMPLETE).sum()) < 6, "the kill should land mid-build"
    for row in np.flatnonzero(status == format.STATUS_COMPLETE):  # what was recorded is intact
        open_cache(out).read_row(int(row))
    subprocess.run(FEATCACHE + _cli_args(nus_six, pillar_ckpt, out), check=True, capture_output=True)
    assert verify_cache(str(out)).ok
    assert_same_cache(str(out), reference_cache)


def test_two_rank_torchrun_build_equals_single_process(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "two_ranks"
    # same intra-op thread count as the in-process reference: CPU conv sums depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "-m", "featcache.cli"] + _cli_args(nus_six, pillar_ckpt, out),
                   check=True, capture_output=True, env=env, timeout=600)
    assert verify_cache(str(out)).ok
    assert_same_cache(str(out), reference_cache)



# -- damage ------------------------------------------------------------------------------------
def test_corrupt_and_deleted_chunks_are_found_and_repaired(reference_cache, nus_six, pillar_ckpt, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(reference_cache, out)
    cache = open_cache(out)
    flipped = chunk_file(out, "pts_neck.0", 1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    chunk_file(out, "pts_middle_encoder", 4).unlink()

    report = verify_cache(str(out))
    assert not report.ok
    assert sorted(key for key, _ in report.corrupt) == sorted([cache.row_keys[1], cache.row_keys[4]])
    assert any("pts_neck.0" in reason for key, reason in report.corrupt if key == cache.row_keys[1])
    # a plain read checks each chunk's own crc32c, and a complete sample's missing chunk is damage
    with pytest.raises(CorruptSampleError, match=f"{cache.row_keys[1]}.*pts_neck.0.*crc32c"):
        cache[cache.row_keys[1]]
    with pytest.raises(CorruptSampleError, match=f"{cache.row_keys[4]}.*pts_middle_encoder.*checksum the build recorded"):
        cache[cache.row_keys[4]]
    cache[cache.row_keys[0]]  # undamaged samples still read

    cli = subprocess.run(FEATCACHE + ["verify", str(out)], capture_output=True, text=True)
    assert cli.returncode == 1 and cache.row_keys[1] in cli.stdout and cache.row_keys[4] in cli.stdout

    repair = ["verify", str(out), "--repair"] + cfg_option_args(nus_cfg_options(nus_six))
    fixed = subprocess.run(FEATCACHE + repair, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "repaired 2 samples" in fixed.stdout
    assert_same_cache(str(out), reference_cache)


def test_all_zero_layer_has_no_chunk_yet_reads_and_verifies(reference_cache, tmp_path):
    from featcache.writer import CacheWriter

    out = tmp_path / "zeros"
    shutil.copytree(reference_cache, out)
    features = open_cache(out).read_row(0)
    features["pts_neck.0"] = np.zeros_like(features["pts_neck.0"])  # e.g. a frame with no points in range
    CacheWriter.open(str(out)).write_sample(0, features)
    # zarr stores no chunk equal to the fill value: the reader cannot tell this from a lost chunk by
    # the chunk alone, only by the checksum the build recorded
    assert not [path for path in (out / "features" / "pts_neck.0" / "c" / "0").rglob("*") if path.is_file()]
    cache = open_cache(out)
    assert not cache.read_row(0)["pts_neck.0"].any()
    assert verify_cache(str(out)).ok


def test_damaged_records_row_spoils_only_its_own_sample(reference_cache, tmp_path):
    out = tmp_path / "records"
    shutil.copytree(reference_cache, out)
    record = next((out / format.RECORDS_ARRAY / "c" / "3").rglob("*"))
    data = bytearray(record.read_bytes())
    data[-5] ^= 0xFF  # the last layer's checksum (the chunk's own crc32c follows it)
    record.write_bytes(bytes(data))
    cache = open_cache(out)
    # the row fails its chunk crc32c: that row reads as damaged, the other rows' status as it was
    assert list(cache.status()) == [format.STATUS_DAMAGED if row == 3 else format.STATUS_COMPLETE
                                    for row in range(len(cache))]
    report = verify_cache(str(out))
    assert [key for key, _ in report.corrupt] == [cache.row_keys[3]] and report.bad_rows == [3]


def test_intact_chunk_of_another_sample_is_caught_by_verify_not_by_a_plain_read(reference_cache, tmp_path):
    out = tmp_path / "swapped"
    shutil.copytree(reference_cache, out)
    shutil.copyfile(chunk_file(out, "pts_neck.0", 3), chunk_file(out, "pts_neck.0", 2))
    plain, checked = open_cache(out), open_cache(out, check_values=True)
    reference = open_cache(reference_cache)
    # its crc32c is intact, so a plain read hands out sample 3's stored values (with sample 2's int8
    # scales): the price of checking 5.7 MB of chunk bytes per read instead of 31 MB of values
    assert np.array_equal(plain.read_row(2, decode=False)["pts_neck.0"], reference.read_row(3, decode=False)["pts_neck.0"])
    with pytest.raises(CorruptSampleError, match=f"{plain.row_keys[2]}.*pts_neck.0.*checksum the build recorded"):
        checked.read_row(2)
    report = verify_cache(str(out))
    assert [key for key, _ in report.corrupt] == [plain.row_keys[2]] and report.bad_rows == [2]


def _without_chunk_checksums(location: Path) -> None:
    """Rewrite a cache's per-sample arrays as featcache wrote them before chunks carried a crc32c."""
    group = store.open_group(location, mode="r+")
    for path in [f"{kind}/{name}" for kind in ("features", "qparams") for name in group[kind].array_keys()]:
        array = group[path]
        values, compressors = array[...], [codec for codec in array.compressors
                                           if not isinstance(codec, zarr_codecs.Crc32cCodec)]
        assert len(compressors) == len(array.compressors) - 1, path
        del group[path]
        group.create_array(path, shape=values.shape, chunks=array.chunks, dtype=values.dtype,
                           fill_value=array.fill_value, compressors=compressors or None)[...] = values


def test_cache_without_chunk_checksums_reads_and_is_checked_by_its_values(reference_cache, tmp_path):
    out = tmp_path / "older"
    shutil.copytree(reference_cache, out)
    _without_chunk_checksums(out)
    cache, reference = open_cache(out), open_cache(reference_cache)
    assert not cache._source.array(format.feature_path("pts_neck.0")).chunk_checksum
    for key in reference.row_keys:
        assert all(np.array_equal(value, reference.read(key)[name]) for name, value in cache.read(key).items())
    assert verify_cache(str(out)).ok
    flipped = chunk_file(out, "pts_neck.0", 1)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    chunk_file(out, "pts_middle_encoder", 4).unlink()
    fresh = open_cache(out)
    for row, layer in ((1, "pts_neck.0"), (4, "pts_middle_encoder")):
        with pytest.raises(CorruptSampleError, match=f"{fresh.row_keys[row]}.*{layer}"):
            fresh.read_row(row)
    assert sorted(verify_cache(str(out)).bad_rows) == [1, 4]


def test_unbuilt_sample_and_unknown_key_are_clear_errors(reference_cache, tmp_path):
    out = tmp_path / "partial"
    shutil.copytree(reference_cache, out)
    from featcache.writer import CacheWriter

    cache = open_cache(out)
    CacheWriter.open(str(out)).clear([2])
    with pytest.raises(SampleNotCachedError, match=f"{cache.row_keys[2]}.*not written yet"):
        cache[cache.row_keys[2]]
    with pytest.raises(SampleNotCachedError, match="no-such-token.*not in cache"):
        cache["no-such-token"]
    assert verify_cache(str(out)).missing == [cache.row_keys[2]]


def test_feature_cache_is_a_mapping_that_names_mistakes(reference_cache):
    import collections.abc

    from featcache.errors import SampleKeyTypeError, UnknownLayerError

    cache = open_cache(reference_cache)
    assert isinstance(cache, collections.abc.Mapping)
    assert list(cache.keys()) == list(cache) == list(cache.row_keys) and len(cache) == 6
    assert cache.row_keys[0] in cache and "no-such-token" not in cache and 0 not in cache
    key, features = next(iter(cache.items()))
    assert key == cache.row_keys[0] and set(features) == {"pts_middle_encoder", "pts_neck.0"}
    assert cache.get("no-such-token") is None and torch.equal(cache.get(key)["pts_neck.0"], features["pts_neck.0"])
    assert cache == cache and cache != open_cache(reference_cache)  # identity: a content comparison reads it all

    # a key of the wrong type says which type the cache uses (and is both a KeyError and a TypeError)
    for wrong in (0, np.int64(2), b"ca9a282c9e77460f8360f564131a8af5"):
        with pytest.raises(SampleKeyTypeError, match=f"keyed by str .*e.g. {cache.row_keys[0]!r}.*not "
                                                     f"{type(wrong).__name__}"):
            cache[wrong]
    with pytest.raises(TypeError, match="read_row\\(N\\)"):
        cache.get(0)
    with pytest.raises(KeyError):
        cache.row_of(1)
    # unknown layers raise, naming the cache's layers, in every read
    holds = "it holds pts_middle_encoder, pts_neck.0"
    for read in (lambda: cache.read(key, layers=["typo"]), lambda: cache.read(key, layers="pts_neck"),
                 lambda: cache.read_row(0, layers=["pts_neck.0", "pts_backbone"]),
                 lambda: cache.read_row_tensors(0, layers=["typo"]), lambda: cache.prefetch([0], layers=["typo"])):
        with pytest.raises(UnknownLayerError, match=holds):
            read()
    assert set(cache.read(key, layers="pts_neck.0")) == {"pts_neck.0"}
    with pytest.raises(IndexError, match="row 6 is not a row"):
        cache.read_row(6)


def test_non_finite_teacher_output_is_reported_not_cached(tmp_path, nus_six):
    model = models.build_model(models.load_config(PILLAR_CONFIG))
    with torch.no_grad():
        model.pts_neck.deblocks[0][0].weight.fill_(float("nan"))
    ckpt = save_openmmlab_checkpoint(model, tmp_path / "nan.pth")
    out = tmp_path / "nan_cache"
    cli = subprocess.run(FEATCACHE + _cli_args(nus_six, ckpt, out), capture_output=True, text=True)
    assert cli.returncode == 1
    assert "non-finite" in cli.stderr and "ca9a282c9e77460f8360f564131a8af5" in cli.stderr
    status = open_cache(out).status()
    assert (status == format.STATUS_INVALID).all()
    with pytest.raises(SampleNotCachedError, match="invalid"):
        open_cache(out)["ca9a282c9e77460f8360f564131a8af5"]


# -- other teachers, stores and formats ------------------------------------------------------
@pytest.fixture
def one_thread():
    # spconv's CPU kernels scatter-add across threads in no fixed order: a voxel teacher's output
    # varies run to run with >1 thread (measured up to 16% of max|x| with random weights).
    # One thread makes the live reference repeatable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_voxel0075_teacher_caches_bevfusion_lidar_shapes(tmp_path_factory, nus_one, one_thread):
    ckpt = teacher_checkpoint(tmp_path_factory.mktemp("ckpt"), VOXEL_CONFIG, seed=3)
    out = tmp_path_factory.mktemp("voxel") / "cache"
    options = nus_cfg_options(nus_one)
    build_cache(BuildOptions(VOXEL_CONFIG, str(ckpt), str(out), cfg_options=options, num_workers=0, progress=False))
    cache = open_cache(out)
    assert {layer.name: layer.shape for layer in cache.manifest.layers} == {
        "pts_middle_encoder": (256, 180, 180), "pts_backbone.0": (128, 180, 180),
        "pts_backbone.1": (256, 90, 90), "pts_neck.0": (512, 180, 180)}
    live = Teacher(VOXEL_CONFIG, str(ckpt), "pts_middle_encoder,pts_backbone,pts_neck",
                   cfg_options=options).features_of_row(0)
    cached = cache.read(cache.row_keys[0])
    for name, value in live.items():
        assert_within_int8_step(cached[name], value, name)


def test_hdf5_export_reads_like_the_zarr_cache(reference_cache, tmp_path):
    out = tmp_path / "cache.h5"
    cli = subprocess.run(FEATCACHE + ["export", reference_cache, "--format", "hdf5", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    zarr_cache, h5_cache = open_cache(reference_cache), open_cache(out)
    assert h5_cache.row_keys == zarr_cache.row_keys and h5_cache.manifest == zarr_cache.manifest
    for key in zarr_cache.row_keys:
        for name, value in zarr_cache[key].items():
            assert torch.equal(h5_cache[key][name], value)


def test_inspect_reports_sizes_and_plots(reference_cache, tmp_path, nus_six):
    png = tmp_path / "bev.png"
    args = ["inspect", reference_cache, "--plot", str(png), "--fidelity", "1"] + cfg_option_args(nus_cfg_options(nus_six))
    cli = subprocess.run(FEATCACHE + args, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "6/6 complete" in cli.stdout and "int8-zstd3" in cli.stdout and "pts_neck.0" in cli.stdout
    cosines = [float(line.split("cosine ")[1].split()[0]) for line in cli.stdout.splitlines() if "cosine" in line]
    assert len(cosines) == 2 and min(cosines) > 0.999
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_reader_is_safe_in_dataloader_workers(reference_cache):
    from torch.utils.data import DataLoader, Dataset

    cache = open_cache(reference_cache)

    class Rows(Dataset):
        def __len__(self):
            return len(cache)

        def __getitem__(self, row):
            return digest(cache[cache.row_keys[row]]["pts_neck.0"])

    def digest(tensor):  # exact and independent of summation order (which varies with threads)
        return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()

    digests = list(DataLoader(Rows(), batch_size=None, num_workers=2))
    assert digests == [digest(cache[key]["pts_neck.0"]) for key in cache.row_keys]


def test_cached_targets_dataset_pairs_items_by_key(reference_cache, nus_six):
    from featcache.teacher.paired import CachedTargetsDataset

    cache = open_cache(reference_cache)
    cfg = models.load_config(PILLAR_CONFIG, nus_cfg_options(nus_six))
    dataset_cfg = models.dataset_cfg_for_split(cfg, "train")
    dataset_cfg["ann_file"] = "reversed.pkl"  # same samples, opposite order: pairing must follow keys
    import pickle

    infos = pickle.loads((nus_six / "infos.pkl").read_bytes())
    infos["data_list"] = infos["data_list"][::-1]
    (nus_six / "reversed.pkl").write_bytes(pickle.dumps(infos))
    paired = CachedTargetsDataset(models.build_dataset(dataset_cfg), cache, layers=["pts_neck.0"])
    item, targets = paired[0]
    assert item["data_samples"].metainfo["lidar_path"].endswith("_gen5.pcd.bin")
    assert torch.equal(targets["pts_neck.0"], cache[cache.row_keys[5]]["pts_neck.0"])


@pytest.fixture
def s3_server(tmp_path):
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


def test_s3_build_and_read_match_local(reference_cache, nus_six, pillar_ckpt, s3_server, monkeypatch):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    s3fs.S3FileSystem(**storage).mkdir("featcache-test")
    url = "s3://featcache-test/pillar"
    args = _cli_args(nus_six, pillar_ckpt, url, "--storage-options", json.dumps(storage))
    built = subprocess.run(FEATCACHE + args, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    remote, local = open_cache(url, storage_options=storage), open_cache(reference_cache)
    assert remote.row_keys == local.row_keys and remote.manifest.identity() == local.manifest.identity()
    for key in local.row_keys:
        for name, value in local.read(key).items():
            assert np.array_equal(remote.read(key)[name], value)
    assert verify_cache(url, storage).ok
    again = subprocess.run(FEATCACHE + args, capture_output=True, text=True)
    assert again.returncode == 0 and "wrote 0 samples" in again.stdout


# -- readahead ---------------------------------------------------------------------------------
def _resident_fraction(path: Path) -> float:
    """Fraction of a file's pages in the page cache (mincore(2) on a shared read-only mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
            return sum(byte & 1 for byte in vector.raw) / pages
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_prefetch_brings_a_cold_rows_chunks_into_the_page_cache(reference_cache, tmp_path):
    out = tmp_path / "cold"
    shutil.copytree(reference_cache, out)
    cache = open_cache(out)
    layers = cache.layer_names
    files = {row: [chunk_file(out, layer, row) for layer in layers] for row in (2, 4)}
    for paths in files.values():
        for path in paths:
            path.read_bytes()
            _evict(path)
    if max(_resident_fraction(path) for paths in files.values() for path in paths) > 0.5:
        pytest.skip("this filesystem keeps file pages after POSIX_FADV_DONTNEED (tmpfs?): no file can be made cold")
    cache.prefetch([2, 99], layers=layers)  # an unknown row is skipped: prefetch is a hint
    cache._source._readahead.shutdown(wait=True)
    deadline = time.monotonic() + 10
    while min(_resident_fraction(path) for path in files[2]) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel's reads complete after the advice returns
    assert min(_resident_fraction(path) for path in files[2]) == 1.0
    assert max(_resident_fraction(path) for path in files[4]) < 0.5  # rows not announced stay cold


def test_readahead_sampler_keeps_the_order_and_announces_rows_ahead(reference_cache):
    from featcache.reader import ReadaheadSampler

    cache = open_cache(reference_cache)
    announced: list[int] = []

    class Recording(type(cache)):
        def prefetch(self, rows, layers=None):
            announced.extend(rows)

    cache.__class__ = Recording
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(3)).tolist()
    rows = [len(cache) - 1 - index for index in range(len(cache))]  # dataset index -> cache row
    sampler = ReadaheadSampler(order, cache, rows=rows, depth=2)
    yielded = []
    for index in sampler:
        yielded.append(index)
        # every index yielded so far, and the next two, were announced, as their cache rows
        assert announced == [rows[i] for i in order[:min(len(yielded) + 2, len(order))]]
    assert yielded == order and len(sampler) == len(order)
