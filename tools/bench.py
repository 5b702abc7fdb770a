"""Benchmarks of featcache on BEVFusion-lidar shapes, measured side by side in one run.

The teacher is mmdet3d's CenterPoint-voxel0075 (the encoder, backbone and neck of
BEVFusion-lidar: pts_middle_encoder 256x180x180, pts_backbone 128x180x180 + 256x90x90, pts_neck
512x180x180) with a seeded checkpoint (featcache.testing.teacher_checkpoint), run on the real
nuScenes scan of ../shared/data and rigidly transformed copies of it (make_nuscenes_like). Every
figure of BENCHMARKS.md comes from this script's own measurements; the file is rewritten at the end.

Usage: python tools/bench.py [--quick] [--out BENCHMARKS.md] [--epochs 20]

``--quick`` runs every figure at tiny sizes (a smoke test, under 3 minutes) and, unless ``--out``
is given, prints the report instead of writing BENCHMARKS.md. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache import codecs, format, handoff, store  # noqa: E402
from featcache.reader import FeatureCache, ReadaheadSampler  # noqa: E402

CODECS = ("fp32-none", "fp16-zstd1", "fp16-lz4", "bf16-zstd3", "int8-zstd3", "int8-lz4")
LAYERS = ("pts_middle_encoder", "pts_backbone", "pts_neck")
BUILD_WORKERS = 1  # BuildOptions' default DataLoader workers; the forward-only run uses the same
NUSCENES_TRAIN_SAMPLES = 28130
STUDENT_CONFIG = REPO / "configs" / "students" / "centerpoint_pillar_half_nus.py"
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=536870912:glibc.malloc.trim_threshold=1073741824"
RESULT_MARK = "BENCH-RESULT "
START = time.perf_counter()


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    frames: int  # real teacher forwards (build, storage, fidelity)
    scale_rows: int  # N of the scale figure; the larger cache has 8N rows
    read_passes: int  # timed passes per read measurement (median reported)
    warmup_steps: int  # untimed training steps before the measured ones, per variant
    train_steps: int  # measured steps per no-KD / cached-KD variant
    online_steps: int  # measured steps of the online-KD variant
    train_batch: int | None  # training batch size (None: the student config's own)


FULL = Sizes(frames=6, scale_rows=12, read_passes=3, warmup_steps=1, train_steps=6, online_steps=3,
             train_batch=None)
QUICK = Sizes(frames=2, scale_rows=4, read_passes=1, warmup_steps=0, train_steps=1, online_steps=1,
              train_batch=1)


@dataclass
class Target:
    """One goal of a figure and whether this run met it (None: could not be evaluated)."""

    name: str
    goal: str
    measured: str
    passed: bool | None


@dataclass
class Section:
    """One figure of the report: markdown lines (tables, notes) and its targets."""

    title: str
    lines: list[str]
    targets: list[Target] = field(default_factory=list)


@dataclass
class Context:
    """What the figures share: data, teacher, reference features and the caches made from them."""

    sizes: Sizes
    epochs: int
    work: Path
    data_root: Path
    checkpoint: Path
    cfg_options: dict[str, Any]
    cold_failure: str | None  # why cold reads are impossible, None when they work
    load_at_start: float  # 1-minute load average when the run began (other jobs share the machine)
    keys: list[str] = field(default_factory=list)
    features: list[dict[str, np.ndarray]] = field(default_factory=list)  # fp32 teacher output per frame
    built_cache: Path | None = None
    forward_s_per_sample: float = 0.0
    build_s_per_sample: float = 0.0
    codec_caches: dict[str, Path] = field(default_factory=dict)
    codec_bytes: dict[str, float] = field(default_factory=dict)
    codec_read: dict[str, dict[str, float]] = field(default_factory=dict)
    scale_caches: dict[int, Path] = field(default_factory=dict)
    scale_write_s: dict[int, float] = field(default_factory=dict)
    default_read: dict[str, float] = field(default_factory=dict)  # samples/s, 0 workers, per warm/cold


# -- helpers ----------------------------------------------------------------------------------

def log(message: str) -> None:
    """Progress line on stderr with the elapsed time."""
    print(f"[bench {time.perf_counter() - START:7.1f}s] {message}", file=sys.stderr, flush=True)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def verdict(passed: bool | None) -> str:
    """PASS / MISS / n/a (a reported figure without a target)."""
    return {True: "PASS", False: "**MISS**", None: "n/a"}[passed]


def drop_page_cache() -> str | None:
    """Empty the kernel page cache (``sync; echo 3 > /proc/sys/vm/drop_caches``); the reason on failure."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def fp32_bytes(manifest: format.Manifest) -> int:
    """float32 bytes of one sample over all layers."""
    return sum(int(np.prod(layer.shape)) * 4 for layer in manifest.layers)


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def cpu_model() -> str:
    """CPU model name(s) from /proc/cpuinfo."""
    with open("/proc/cpuinfo") as handle:
        names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    return f"{names[0]} x{len(names)}" if names else platform.processor() or "unknown"


def memory_total_gib() -> float:
    """MemTotal of /proc/meminfo, GiB."""
    with open("/proc/meminfo") as handle:
        kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
    return kib / 2**20


def shmem_huge_pages() -> str:
    """The kernel's transparent-huge-page policy for shared memory (tmpfs), e.g. 'never'."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else text.strip()


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    with open("/proc/self/status") as handle:
        kib = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
    return kib / 1024


# -- cache writing ----------------------------------------------------------------------------

def derived_manifest(base: format.Manifest, keys: list[str], codec: codecs.CodecSpec | None,
                     note: str) -> format.Manifest:
    """The manifest of a real build, for other keys (and optionally another codec for every layer)."""
    layers = tuple(dataclasses.replace(layer, codec=codec) for layer in base.layers) if codec else base.layers
    return dataclasses.replace(base, layers=layers, num_samples=len(keys), dataset_id=format.dataset_identity(keys),
                               created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extra={**base.extra, "bench": note})


def write_cache(path: Path, manifest: format.Manifest, keys: list[str],
                sample: Callable[[int], dict[str, np.ndarray]]) -> float:
    """Write every row with featcache's CacheWriter; seconds spent in write_sample (encode, checksum, store)."""
    from featcache.writer import CacheWriter

    writer = CacheWriter.create(str(path), manifest, keys)
    start = time.perf_counter()
    for row in range(len(keys)):
        writer.write_sample(row, sample(row))
    return time.perf_counter() - start


def stored_bytes_per_sample(path: Path, manifest: format.Manifest) -> float:
    """Mean stored bytes of one sample: its feature chunks plus int8 scale chunks (store.chunk_nbytes)."""
    group = store.open_group(str(path))
    total = 0
    for layer in manifest.layers:
        arrays = [group[format.feature_path(layer.name)]]
        if layer.codec.precision == "int8":
            arrays.append(group[format.qparams_path(layer.name)])
        total += sum(store.chunk_nbytes(array, row) or 0 for array in arrays for row in range(manifest.num_samples))
    return total / manifest.num_samples


# -- read measurements (run in a fresh subprocess per environment) -----------------------------

class CacheRows(torch.utils.data.Dataset):
    """Row i of a cache as the trainer's pipeline hands it over (``PackDetInputsWithCache``):
    ``{layer: stored tensor}`` plus int8 scale/offset tensors, read through FeatureCache by key with
    chunk checksums checked; the float conversion happens later, on the training device."""

    def __init__(self, location: str) -> None:
        self.cache = FeatureCache(location)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        item = {}
        for name, (values, qparams) in self.cache.read_row_tensors(row).items():
            item[name] = values
            if qparams is not None:
                item[f"{name}/qparams"] = qparams
        return item


class FilledRows(torch.utils.data.Dataset):
    """As many items as a cache has rows, each tensors of its layers' stored shapes and dtypes (uint8 for
    int8 codecs) filled with ones: what a DataLoader costs to hand over a sample, without reading or
    decoding. ``reused=False``: fresh tensors, which torch copies into new shared memory to send (its
    default); ``reused=True``: in a worker, tensors in ``featcache.handoff`` buffers, as the reader uses."""

    def __init__(self, location: str, reused: bool = False) -> None:
        cache = FeatureCache(location)
        self.rows, self.reused = len(cache), reused
        self.layers = {layer.name: (layer.shape, layer.codec.storage_dtype) for layer in cache.manifest.layers}

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if self.reused and torch.utils.data.get_worker_info() is not None:
            tensors = handoff.shared_tensors(list(self.layers.values()))
        else:
            tensors = [torch.from_numpy(np.empty(shape, dtype)) for shape, dtype in self.layers.values()]
        for tensor in tensors:
            tensor.fill_(1)
        return dict(zip(self.layers, tensors))


class ChunkFileRows(torch.utils.data.Dataset):
    """Row i of a local cache as the byte count of its chunk files, read whole: the I/O floor of a read."""

    def __init__(self, location: str) -> None:
        group = store.open_group(location)
        manifest = FeatureCache(location).manifest
        arrays = [group[format.feature_path(layer.name)] for layer in manifest.layers]
        arrays += [group[format.qparams_path(layer.name)] for layer in manifest.layers
                   if layer.codec.precision == "int8"]
        arrays.append(group[format.RECORDS_ARRAY])
        self.location, self.arrays, self.rows = location, arrays, manifest.num_samples

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> int:
        return sum(len(chunk_bytes(self.location, array, row)) for array in self.arrays)


def row_loader(dataset: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """One sample per item, shuffled, workers persistent across passes as the training configs have
    them (mmdet3d's and ours): a pass then measures the steady state, not worker start-up. Cache
    rows are sampled through ``ReadaheadSampler``, as ``featcache train`` samples them."""
    sampler: torch.utils.data.Sampler = torch.utils.data.RandomSampler(dataset,
                                                                        generator=torch.Generator().manual_seed(0))
    if isinstance(dataset, CacheRows):
        sampler = ReadaheadSampler(sampler, dataset.cache)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0)


def timed_pass(loader: torch.utils.data.DataLoader) -> float:
    """Steady-state samples/s of one pass over a ``row_loader``: from the first round of items
    received (one per worker, which all started together) to the last item."""
    workers = loader.num_workers
    arrivals = [time.perf_counter() for _ in loader]
    first_round = max(workers, 1)
    if len(arrivals) <= first_round:
        raise ValueError(f"a timed pass with {workers} workers needs more than {first_round} samples")
    return (len(arrivals) - first_round) / (arrivals[-1] - arrivals[first_round - 1])


def decompressor(codec: codecs.CodecSpec) -> Callable[[bytes, np.ndarray], Any]:
    """The numcodecs decoder behind a featcache codec's zarr compressor, as (chunk bytes, output) -> None."""
    import numcodecs

    if codec.compressor == "zstd":
        return numcodecs.Zstd().decode
    if codec.compressor == "lz4":
        return numcodecs.Blosc().decode

    def copy(raw: bytes, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
    return copy


def chunk_bytes(location: str, array: Any, row: int) -> bytes:
    """The stored (compressed) bytes of one sample's chunk of a local cache's array."""
    return (Path(location) / array.path / store.row_chunk_key(array, row)).read_bytes()


def compressed_payload(array: Any, chunk: bytes) -> bytes:
    """A stored chunk without the crc32c zarr appends to it (``codecs.checksummed``): what the
    compressor alone decodes."""
    return chunk[:-4] if codecs.has_chunk_checksum(array.metadata) else chunk


def in_memory_decode_rate(location: str, passes: int) -> float:
    """Samples/s of decoding the cache's stored chunk bytes, already in memory, into what the trainer's
    reader hands over: numcodecs decompress into preallocated stored-value (and int8 scale/offset)
    outputs, reused row after row (no allocation, no zarr, no file, no checksum): the codec's own
    speed. The float conversion is the training device's work."""
    group = store.open_group(location)
    manifest = FeatureCache(location).manifest
    chunks: list[list[tuple[format.LayerSpec, bytes, bytes | None]]] = []
    for row in range(manifest.num_samples):
        sample = []
        for layer in manifest.layers:
            qparams = None
            if layer.codec.precision == "int8":
                array = group[format.qparams_path(layer.name)]
                qparams = compressed_payload(array, chunk_bytes(location, array, row))
            array = group[format.feature_path(layer.name)]
            sample.append((layer, compressed_payload(array, chunk_bytes(location, array, row)), qparams))
        chunks.append(sample)
    decoders = {layer.name: decompressor(layer.codec) for layer in manifest.layers}
    outputs = {layer.name: (np.zeros(layer.shape, layer.codec.storage_dtype), np.zeros((2, layer.shape[0]), np.float32))
               for layer in manifest.layers}
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0)).tolist()
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for row in order:
            for layer, data, qbytes in chunks[row]:
                stored, qparams = outputs[layer.name]
                decoders[layer.name](data, stored)
                if qbytes is not None:
                    qparams.reshape(-1).view(np.uint8)[:] = np.frombuffer(qbytes, np.uint8)
        rates.append(len(order) / (time.perf_counter() - start))
    return statistics.median(rates)


def run_read_jobs(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run read jobs in this process (see :func:`read_in_subprocess`); returns results and peak RSS."""
    results = []
    for job in jobs:
        if job["kind"] == "decode":
            results.append({"samples_per_s": in_memory_decode_rate(job["cache"], job["passes"])})
            continue
        dataset_type = {"read": CacheRows, "handoff": FilledRows, "files": ChunkFileRows,
                        "handoff-reused": functools.partial(FilledRows, reused=True)}[job["kind"]]
        loader = row_loader(dataset_type(job["cache"]), job["workers"])
        collections.deque(loader, maxlen=0)  # untimed: starts the workers, fills the page cache (dropped when cold)
        rates = []
        for _ in range(job["passes"]):
            if job["mode"] == "cold":
                failure = drop_page_cache()
                if failure:
                    raise RuntimeError(f"cold read requested but the page cache cannot be dropped: {failure}")
                # untimed, another cache: reloads the code pages the drop evicted, not this cache's data
                collections.deque(row_loader(dataset_type(job["primer"]), job["workers"]), maxlen=0)
            rates.append(timed_pass(loader))
        results.append({"samples_per_s": statistics.median(rates), "passes": rates})
    return {"results": results, "peak_rss_mb": peak_rss_mb()}


def run_in_subprocess(option: str, job: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``bench.py <option> <job as JSON>`` in a fresh interpreter (its own heap, malloc settings
    and peak RSS) and return what it printed after RESULT_MARK. Its progress lines pass through as
    they come; the rest of its stderr (library warnings) is shown only if it fails."""
    with tempfile.TemporaryFile(mode="w+") as stdout:
        child = subprocess.Popen([sys.executable, __file__, option, json.dumps(job)], env=env, cwd=REPO,
                                 stdout=stdout, stderr=subprocess.PIPE, text=True)
        other = collections.deque(maxlen=60)
        for line in child.stderr:
            if line.startswith("[bench"):
                print(line, end="", file=sys.stderr, flush=True)
            else:
                other.append(line)
        if child.wait() != 0:
            raise RuntimeError(f"bench subprocess {option} failed (exit {child.returncode}):\n{''.join(other)}")
        stdout.seek(0)
        line = next(line for line in reversed(stdout.read().splitlines()) if line.startswith(RESULT_MARK))
    return json.loads(line[len(RESULT_MARK):])


def read_in_subprocess(jobs: list[dict[str, Any]], glibc_tunables: bool = False) -> dict[str, Any]:
    """Run read jobs in a fresh interpreter: its own malloc settings (GLIBC_TUNABLES is read at
    process start) and its own peak RSS. Jobs: ``{"kind": "read"|"handoff"|"handoff-reused"|"files",
    "cache", "workers", "mode": "warm"|"cold", "passes", "primer"}`` (primer: another cache of the same
    kind, read untimed after each page-cache drop) or ``{"kind": "decode", "cache", "passes"}``."""
    env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
    if glibc_tunables:
        env["GLIBC_TUNABLES"] = GLIBC_TUNABLES
    return run_in_subprocess("--read-jobs", jobs, env)


# -- set-up -----------------------------------------------------------------------------------

def prepare(sizes: Sizes, epochs: int, work: Path) -> Context:
    """Frames (real scan + transformed copies), a seeded voxel0075 checkpoint, the cold-read check."""
    from featcache.testing import VOXEL_CONFIG, make_nuscenes_like, nus_cfg_options, teacher_checkpoint

    load_at_start = os.getloadavg()[0]
    log(f"preparing {sizes.frames} frames and a seeded {VOXEL_CONFIG.split('/')[-1]} checkpoint in {work}")
    data_root = make_nuscenes_like(work / "data", sizes.frames)
    checkpoint = teacher_checkpoint(work, VOXEL_CONFIG, seed=5)
    cold_failure = drop_page_cache()
    log("cold reads: " + ("page cache can be dropped" if cold_failure is None else f"unavailable ({cold_failure})"))
    return Context(sizes=sizes, epochs=epochs, work=work, data_root=data_root, checkpoint=checkpoint,
                   cfg_options=nus_cfg_options(data_root, splits=("train",)), cold_failure=cold_failure,
                   load_at_start=load_at_start)


# -- figures ----------------------------------------------------------------------------------

def run_build_job(job: dict[str, Any]) -> dict[str, Any]:
    """Figure 3's measurements, in this (fresh) process: teacher forward only, ``build_cache``, then
    the forward again, so machine drift shows as a gap between the two forward runs instead of biasing
    the ratio. The first forward's features are saved to ``job["features"]`` for the other figures."""
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.teacher.detector import Teacher
    from featcache.testing import VOXEL_CONFIG, nus_cfg_options

    torch.set_num_threads(1)
    cfg_options = nus_cfg_options(Path(job["data_root"]), splits=("train",))

    def forward_only(keep: bool) -> tuple[float, list[str]]:
        teacher = Teacher(VOXEL_CONFIG, job["checkpoint"], list(LAYERS), split="train", cfg_options=cfg_options)
        kept = []
        start = time.perf_counter()
        for _, _, batch in teacher.loader(range(len(teacher.keys)), 1, BUILD_WORKERS):
            features = teacher.features(batch)
            if keep:
                kept.append({name: value[0] for name, value in features.items()})
        seconds = time.perf_counter() - start
        for row, sample in enumerate(kept):
            np.savez(Path(job["features"]) / f"{row}.npz", **sample)
        return seconds, list(teacher.keys)

    log("build: teacher forward only (first run)")
    forward_first, keys = forward_only(keep=True)
    log("build: featcache.teacher.build.build_cache (default codec)")
    start = time.perf_counter()
    result = build_cache(BuildOptions(VOXEL_CONFIG, job["checkpoint"], job["cache"], layers=LAYERS,
                                      cfg_options=cfg_options, num_workers=BUILD_WORKERS, device="cpu",
                                      progress=False))
    build_wall = time.perf_counter() - start
    log("build: teacher forward only (second run)")
    forward_second, _ = forward_only(keep=False)
    return {"keys": keys, "forward_s": [forward_first, forward_second], "build_s": result.seconds,
            "build_wall_s": build_wall, "written": result.written, "invalid": len(result.invalid_keys),
            "stored_bytes": result.stored_bytes, "raw_bytes": result.raw_bytes}


def figure_build(ctx: Context) -> Section:
    """Figure 3: build_cache samples/s vs the teacher forward alone over the same samples."""
    ctx.built_cache = ctx.work / "built"
    features_dir = ctx.work / "features"
    features_dir.mkdir()
    job = {"data_root": str(ctx.data_root), "checkpoint": str(ctx.checkpoint), "cache": str(ctx.built_cache),
           "features": str(features_dir)}
    result = run_in_subprocess("--build-job", job)
    ctx.keys = result["keys"]
    for row in range(len(ctx.keys)):
        with np.load(features_dir / f"{row}.npz") as sample:
            ctx.features.append({name: sample[name] for name in sample.files})
    n = len(ctx.keys)
    forward_s = statistics.mean(result["forward_s"])
    ctx.forward_s_per_sample, ctx.build_s_per_sample = forward_s / n, result["build_s"] / n
    ratio = ctx.forward_s_per_sample / ctx.build_s_per_sample
    first, second = result["forward_s"]
    lines = [f"{n} samples, torch threads 1, DataLoader workers {BUILD_WORKERS} in every run, batch 1, all in one "
             "fresh process (like the read figures: none of this script's own memory in the way): teacher forward "
             "only, then the build, then the forward again; forward only = the mean of the two. Forward only = "
             "`Teacher.features` over `Teacher.loader` (data loading included, model construction excluded); build "
             "= `BuildResult.seconds` (checksum of the checkpoint, cache creation, forward, encode and write; model "
             "construction excluded, shown separately as the wall time).", ""]
    lines += table(["run", "seconds", "s/sample", "samples/s"], [
        ["teacher forward only, before the build", f"{first:.1f}", f"{first / n:.2f}", f"{n / first:.3f}"],
        ["featcache build (BuildResult.seconds)", f"{result['build_s']:.1f}", f"{ctx.build_s_per_sample:.2f}",
         f"{n / result['build_s']:.3f}"],
        ["featcache build (wall, incl. model construction)", f"{result['build_wall_s']:.1f}",
         f"{result['build_wall_s'] / n:.2f}", f"{n / result['build_wall_s']:.3f}"],
        ["teacher forward only, after the build", f"{second:.1f}", f"{second / n:.2f}", f"{n / second:.3f}"]])
    lines += ["", f"Build overhead over the forward (mean): {result['build_s'] - forward_s:.1f} s in all "
                  f"({(result['build_s'] - forward_s) / n:.2f} s/sample); the two forward runs differ by "
                  f"{abs(first - second) / forward_s:.1%}. Stored: "
                  f"{result['stored_bytes'] / max(result['written'], 1) / 1e6:.2f} MB/sample "
                  f"({result['raw_bytes'] / max(result['stored_bytes'], 1):.1f}x smaller than fp32), "
                  f"{result['written']} written by the loop, invalid: {result['invalid']}."]
    return Section("3. Build path", lines, [Target("build / forward-only samples/s", ">= 0.9", f"{ratio:.3f}",
                                                   ratio >= 0.9)])


def figure_storage(ctx: Context) -> Section:
    """Figure 1: stored bytes/sample and fidelity vs the fp32 teacher output, per codec."""
    from featcache.inspection import fidelity

    base = FeatureCache(str(ctx.built_cache)).manifest
    raw = fp32_bytes(base)
    rows, default_row = [], None
    for name in CODECS:
        log(f"storage: {name}")
        codec = codecs.parse_codec(name)
        path = ctx.work / f"codec-{name}"
        manifest = derived_manifest(base, ctx.keys, codec, f"codec figure: {name}")
        seconds = write_cache(path, manifest, ctx.keys, lambda row: ctx.features[row])
        ctx.codec_caches[name] = path
        ctx.codec_bytes[name] = stored_bytes_per_sample(path, manifest)  # this codec's layers (int8 has qparams)
        cache = FeatureCache(str(path))
        reports = [fidelity(cache, ctx.features[row], row) for row in range(len(ctx.keys))]
        cosines = [layer["cosine"] for report in reports for layer in report.values()]
        max_abs = max(layer["max_abs_error"] for report in reports for layer in report.values())
        max_rel = max(layer["max_abs_error"] / max(layer["max_abs_value"], 1e-30)
                      for report in reports for layer in report.values())
        row = [name, f"{ctx.codec_bytes[name] / 1e6:.2f}", f"{raw / ctx.codec_bytes[name]:.1f}",
               f"{1 - float(np.mean(cosines)):.2e}", f"{min(cosines):.6f}", f"{max_abs:.3g}", f"{max_rel:.2e}",
               f"{raw * len(ctx.keys) / seconds / 1e6:.0f}"]
        rows.append(row)
        if codec == codecs.DEFAULT_CODEC:
            default_row = (ctx.codec_bytes[name], float(np.mean(cosines)))
    built = np.asarray(store.open_group(str(ctx.built_cache))[format.RECORDS_ARRAY][:])
    same = np.array_equal(built, np.asarray(
        store.open_group(str(ctx.codec_caches[codecs.DEFAULT_CODEC.name]))[format.RECORDS_ARRAY][:]))
    lines = [f"{len(ctx.keys)} samples of real teacher output (4 layers, fp32 {raw / 1e6:.1f} MB/sample), written "
             "per codec with `CacheWriter` into a cache whose manifest is copied from the build. Bytes = stored "
             "feature chunks (+ int8 scale chunks) per `featcache.store.chunk_nbytes`. Cosine and max abs error per "
             "`featcache.inspection.fidelity` (whole layer map, float64), over every sample and layer; rel = max abs "
             "error / max |fp32| of that layer. Write MB/s = fp32-equivalent MB/s of `write_sample` (encode, crc32c, "
             "compress, store), one thread.", ""]
    lines += table(["codec", "MB/sample", "x smaller than fp32", "1 - mean cos", "min cos", "max abs err",
                    "max rel err", "write MB/s"], rows)
    lines += ["", f"fp32 raw: {raw / 1e6:.2f} MB/sample. The build's checksums equal those of the forward-only "
                  f"features written with the default codec: {'yes' if same else 'NO'} (the fidelity reference is the "
                  "very output the build cached; spconv runs single-threaded)."]
    size, cosine = default_row
    goal = f"<= {raw / 6 / 1e6:.2f} MB (1/6 of fp32) at mean cos >= 0.999"
    measured = f"{size / 1e6:.2f} MB ({raw / size:.1f}x), mean cos {cosine:.6f}"
    return Section("1. Storage", lines, [Target(f"default codec {codecs.DEFAULT_CODEC.name}", goal, measured,
                                                size <= raw / 6 and cosine >= 0.999)])


def make_scale_caches(ctx: Context) -> None:
    """Default-codec caches of N and 8N rows: real teacher features of the frames written repeatedly."""
    base = FeatureCache(str(ctx.built_cache)).manifest
    for rows in (ctx.sizes.scale_rows, 8 * ctx.sizes.scale_rows):
        log(f"writing a {rows}-row cache (default codec) from {len(ctx.features)} real samples")
        keys = [f"{ctx.keys[row % len(ctx.keys)]}-copy{row:05d}" for row in range(rows)]
        path = ctx.work / f"scale-{rows}"
        ctx.scale_write_s[rows] = write_cache(path, derived_manifest(base, keys, None, "synthesised rows"), keys,
                                              lambda row: ctx.features[row % len(ctx.features)])
        ctx.scale_caches[rows] = path


def read_modes(ctx: Context) -> list[str]:
    """Page-cache states measured in this run."""
    return ["warm"] if ctx.cold_failure else ["warm", "cold"]


def cold_method(ctx: Context) -> str:
    """How cold reads were made (or why there are none), for the figure texts."""
    if ctx.cold_failure:
        return f"cold: not measured ({ctx.cold_failure}), warm only"
    return ("cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before every timed pass, then one untimed pass over "
            "another small cache of the same kind so that the code pages the drop evicted (torch, zarr...) are "
            "back and only this cache's data is cold (the host may still cache the VM's disk image)")


def figure_read(ctx: Context) -> Section:
    """Figure 2: FeatureCache through a DataLoader (0/1/2 workers, warm/cold) vs in-memory decode."""
    passes, modes = ctx.sizes.read_passes, read_modes(ctx)
    rows = 8 * ctx.sizes.scale_rows  # the larger scale cache: more rows per timed pass, steadier rates
    location, primer = str(ctx.scale_caches[rows]), str(ctx.codec_caches[codecs.DEFAULT_CODEC.name])
    mb = fp32_bytes(FeatureCache(location).manifest) / 1e6
    stored_mb = ctx.codec_bytes[codecs.DEFAULT_CODEC.name] / 1e6
    cases = [("read", mode, workers) for mode in modes for workers in (0, 1, 2)]
    cases += [("files", mode, 0) for mode in modes] + [("handoff", "warm", workers) for workers in (0, 1, 2)]
    cases += [("handoff-reused", "warm", workers) for workers in (1, 2)]
    tuned_cases = [("read", "warm", 0), ("read", "warm", 2)]

    def jobs_of(selected: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        return [{"kind": "decode", "cache": location, "passes": passes}] + [
            {"kind": kind, "cache": location, "workers": workers, "mode": mode, "passes": passes, "primer": primer}
            for kind, mode, workers in selected]

    log(f"read path: default codec, {rows} rows, workers 0/1/2, {'/'.join(modes)}")
    plain = read_in_subprocess(jobs_of(cases))["results"]
    log("read path: same with GLIBC_TUNABLES")
    tuned = read_in_subprocess(jobs_of(tuned_cases), glibc_tunables=True)["results"]
    decode, decode_tuned = plain[0]["samples_per_s"], tuned[0]["samples_per_s"]
    rate = {case: result["samples_per_s"] for case, result in zip(cases, plain[1:])}
    rate_tuned = {case: result["samples_per_s"] for case, result in zip(tuned_cases, tuned[1:])}
    ctx.default_read = {mode: rate[("read", mode, 0)] for mode in modes}
    labels = {"read": "FeatureCache (stored values) via DataLoader", "files": "chunk files only: read whole, no decode",
              "handoff": "hand-off only, torch's way: fill fresh tensors + DataLoader",
              "handoff-reused": "hand-off only, featcache.handoff buffers: fill + DataLoader"}
    table_rows = [["in-memory decode (numcodecs decompress into reused outputs)", "-", "-", f"{decode:.2f}",
                   f"{decode * mb:.0f}",
                   "1.00", f"{decode_tuned:.2f}"]]
    for case in cases:
        kind, mode, workers = case
        tuned_rate = rate_tuned.get(case)
        table_rows.append([labels[kind], workers, mode if not kind.startswith("handoff") else "-", f"{rate[case]:.2f}",
                           f"{rate[case] * mb:.0f}", f"{rate[case] / decode:.2f}",
                           f"{tuned_rate:.2f}" if tuned_rate else "-"])
    lines = [f"Default codec {codecs.DEFAULT_CODEC.name}, the 8N={rows}-row cache of figure 4, synthesised by "
             f"writing the real teacher features of {len(ctx.features)} frames repeatedly with `CacheWriter` "
             "(manifest copied from the build). "
             f"MB = float32-equivalent MB of features handed out ({mb:.1f} MB/sample), as the trainer's pipeline "
             "(`PackDetInputsWithCache`) hands them out: stored values and int8 scale/offset, the float conversion "
             "left to `CacheDistiller` on the training device (`codecs.decode_tensor`). One sample per DataLoader item "
             "(`batch_size=None`), shuffled through `ReadaheadSampler` as `featcache train` samples (each row's chunk "
             "files announced to the kernel 4 indices before the sampler hands the row's index to the DataLoader, "
             "on top of the DataLoader's own lead), chunk checksums verified, "
             "DataLoader workers persistent across passes as in "
             "the training configs (started by an untimed first pass over the same cache); median of "
             f"{passes} pass(es) over all rows, each timed from the first round of samples received (one per worker) "
             "to the last (steady state: DataLoader worker start-up excluded). "
             f"Warm = after an untimed pass; {cold_method(ctx)}. In-memory decode = the same stored chunk bytes "
             "already in RAM, numcodecs decompress into preallocated stored-value (+ int8 scale/offset) outputs reused "
             "row after row (no allocation: the codec's own speed), one thread, no zarr, no file, no checksum. "
             "Chunk files only = the same rows' chunk files read whole with "
             f"Python (stored bytes, {stored_mb:.1f} MB/sample; MB/s column still in decoded MB; no readahead): the "
             "I/O floor of a plain read. "
             "Hand-off only = each item is tensors of the layers' stored shapes and dtypes filled with ones, no cache "
             "involved: torch's way = fresh tensors, which torch copies into new shared memory to send; "
             "featcache.handoff = tensors in the worker's reused shared-memory buffers, sent as a file descriptor. "
             "FeatureCache = `read_row_tensors`, what `PackDetInputsWithCache` calls: the row's chunk files read "
             "directly into reused buffers on the reader's I/O threads, each chunk's crc32c checked (the stored "
             "bytes; `featcache verify` also sums the values), then decompressed by numcodecs straight into its "
             "output (zarr's own pipeline decodes into a new buffer, then copies); with 0 workers the arrays are "
             "decompressed concurrently (both cores; the in-memory decode uses one), in a DataLoader worker one at "
             "a time as their files arrive, into the worker's reused shared-memory buffers (`featcache.handoff`). "
             "Each column set runs in its own fresh process; the "
             f"last column with `GLIBC_TUNABLES={GLIBC_TUNABLES}` (STORAGE-FACTS: outputs over glibc's 32 MiB mmap "
             "threshold page-fault fresh memory on every read; the 512x180x180 neck map is 66 MB as float32, 17 MB as uint8).", ""]
    lines += table(["reader", "workers", "cache", "samples/s", "MB/s", "/ in-memory decode",
                    "samples/s with GLIBC_TUNABLES"], table_rows)
    lines += ["", f"Per codec (the codec caches of figure 1, {len(ctx.keys)} rows, warm, 0 workers, median of "
                  f"{passes} pass(es)):", ""]
    codec_rows = []
    for name in CODECS:
        result = ctx.codec_read[name]
        codec_rows.append([name, f"{result['decode']:.2f}", f"{result['read']:.2f}",
                           f"{result['read'] / result['decode']:.2f}", f"{result['read'] * mb:.0f}"])
    lines += table(["codec", "in-memory decode samples/s", "FeatureCache samples/s", "ratio", "decoded MB/s"],
                   codec_rows)
    # A worker decompresses a sample, then hands it over: in series, one worker cannot beat
    # 1 / (1/decode + 1/hand-off), whatever the reader does.
    bounds = {kind: 1 / (1 / decode + 1 / rate[(kind, "warm", 1)]) for kind in ("handoff", "handoff-reused")}
    lines += ["", "One-worker bound from this run's rows (in-memory decode and the 1-worker hand-off in series): "
                  f"with torch's hand-off {bounds['handoff']:.2f} samples/s = {bounds['handoff'] / decode:.2f} of the "
                  f"in-memory decode (the kernel zero-fills fresh shared-memory pages for every sample; shared-memory "
                  f"transparent huge pages here: {shmem_huge_pages()}); with featcache.handoff's reused buffers "
                  f"{bounds['handoff-reused']:.2f} = {bounds['handoff-reused'] / decode:.2f}. "
                  "FeatureCache with 1 worker "
                  f"(warm) reaches {rate[('read', 'warm', 1)]:.2f} = "
                  f"{rate[('read', 'warm', 1)] / bounds['handoff-reused']:.2f} of the latter."]
    lines += ["", f"GLIBC_TUNABLES: warm reads x{rate_tuned[('read', 'warm', 0)] / rate[('read', 'warm', 0)]:.2f} "
                  f"(0 workers), x{rate_tuned[('read', 'warm', 2)] / rate[('read', 'warm', 2)]:.2f} (2 workers); "
                  f"in-memory decode x{decode_tuned / decode:.2f}."]
    targets = [Target(f"FeatureCache / in-memory decode, {workers} worker(s), {mode}", ">= 0.8",
                      f"{rate[('read', mode, workers)] / decode:.2f}", rate[("read", mode, workers)] / decode >= 0.8)
               for workers in (0, 1) for mode in modes]
    targets += [Target(f"2 workers / 1 worker, {mode}", ">= 1.6",
                       f"{rate[('read', mode, 2)] / rate[('read', mode, 1)]:.2f}",
                       rate[("read", mode, 2)] / rate[("read", mode, 1)] >= 1.6) for mode in modes]
    return Section("2. Read path", lines, targets)


def measure_codec_reads(ctx: Context) -> None:
    """In-memory decode and FeatureCache read speed (warm, 0 workers) of every codec cache of figure 1."""
    log("read path: per codec")
    jobs = []
    for name in CODECS:
        location = str(ctx.codec_caches[name])
        jobs += [{"kind": "decode", "cache": location, "passes": ctx.sizes.read_passes},
                 {"kind": "read", "cache": location, "workers": 0, "mode": "warm", "passes": ctx.sizes.read_passes}]
    results = read_in_subprocess(jobs)["results"]
    for index, name in enumerate(CODECS):
        ctx.codec_read[name] = {"decode": results[2 * index]["samples_per_s"],
                                "read": results[2 * index + 1]["samples_per_s"]}


def figure_scale(ctx: Context) -> Section:
    """Figure 4: read throughput and peak RSS at N and 8N rows, one fresh process per size."""
    modes = read_modes(ctx)
    primer = str(ctx.codec_caches[codecs.DEFAULT_CODEC.name])
    measured = {}
    for rows, path in ctx.scale_caches.items():
        log(f"scale: {rows} rows")
        jobs = [{"kind": "read", "cache": str(path), "workers": 0, "mode": mode, "passes": ctx.sizes.read_passes,
                 "primer": primer} for mode in modes]
        output = read_in_subprocess(jobs)
        measured[rows] = ({mode: result["samples_per_s"] for mode, result in zip(modes, output["results"])},
                          output["peak_rss_mb"])
        if "cold" in modes:  # the I/O floor at this size, in a process of its own (not in the RSS figure)
            files = read_in_subprocess([{**jobs[0], "kind": "files", "mode": "cold"}])["results"][0]
            measured[rows][0]["files cold"] = files["samples_per_s"]
    small, big = sorted(measured)
    columns = list(measured[small][0])
    rows = [[n, *(f"{measured[n][0][column]:.2f}" for column in columns), f"{measured[n][1]:.0f}"]
            for n in (small, big)]
    lines = [f"Default-codec caches of N={small} and 8N={big} rows (real features of {len(ctx.features)} frames "
             "written repeatedly). One fresh process per size reads every row through FeatureCache + DataLoader "
             f"(0 workers, shuffled, steady-state rate as in figure 2, median of {ctx.sizes.read_passes} pass(es)); "
             f"{cold_method(ctx)}; files cold = the same rows' chunk files read whole, cold, no decode (the I/O "
             "floor, as in figure 2); peak RSS = that process's VmHWM after all its passes.", ""]
    lines += table(["rows", *(f"samples/s {column}" for column in columns), "peak RSS MB"], rows)
    targets = [Target(f"throughput 8N / N, {mode}", ">= 0.9 (flat)",
                      f"{measured[big][0][mode] / measured[small][0][mode]:.2f}",
                      measured[big][0][mode] / measured[small][0][mode] >= 0.9) for mode in modes]
    rss_ratio = measured[big][1] / measured[small][1]
    targets.append(Target("peak RSS 8N / N", "<= 1.1 (flat)", f"{rss_ratio:.2f}", rss_ratio <= 1.1))
    if "cold" in modes:
        files_ratio = measured[big][0]["files cold"] / measured[small][0]["files cold"]
        lines += ["", f"Cold, 8N / N: reads {measured[big][0]['cold'] / measured[small][0]['cold']:.2f}, chunk files "
                      f"alone {files_ratio:.2f}."]
    return Section("4. Scale", lines, targets)


def figure_hdf5(ctx: Context) -> Section:
    """Figure 5: the N-row cache as Zarr vs its featcache.export.export_hdf5 copy."""
    from featcache.export import export_hdf5

    rows, modes = ctx.sizes.scale_rows, read_modes(ctx)
    zarr_path = ctx.scale_caches[rows]
    h5_path = ctx.work / f"scale-{rows}.h5"
    log(f"hdf5: exporting the {rows}-row cache")
    start = time.perf_counter()
    export_hdf5(str(zarr_path), str(h5_path))
    export_s = time.perf_counter() - start
    primers = {zarr_path: ctx.codec_caches[codecs.DEFAULT_CODEC.name], h5_path: ctx.work / "primer.h5"}
    export_hdf5(str(primers[zarr_path]), str(primers[h5_path]))
    jobs = [{"kind": "read", "cache": str(location), "workers": 0, "mode": mode, "passes": ctx.sizes.read_passes,
             "primer": str(primers[location])} for location in (zarr_path, h5_path) for mode in modes]
    log("hdf5: reading both")
    results = read_in_subprocess(jobs)["results"]
    rates = {(job["cache"], job["mode"]): result["samples_per_s"] for job, result in zip(jobs, results)}
    table_rows = []
    for label, location, seconds, what in (
            ("Zarr (featcache)", zarr_path, ctx.scale_write_s[rows], "CacheWriter.write_sample from fp32"),
            ("HDF5 (export_hdf5)", h5_path, export_s, "export_hdf5 from the Zarr cache")):
        size = directory_bytes(location) if location.is_dir() else location.stat().st_size
        table_rows.append([label, what, f"{seconds / rows:.3f}", f"{size / rows / 1e6:.2f}",
                           *(f"{rates[(str(location), mode)]:.2f}" for mode in modes)])
    lines = [f"The {rows}-row default-codec cache and its HDF5 export (same stored values, HDF5 gzip level 1 + "
             "shuffle instead of zstd). Write s/sample is what each path does (not the same work: the Zarr write "
             "encodes fp32, the export re-reads and verifies the Zarr cache). MB/sample = whole file/directory size "
             "/ rows. Read: FeatureCache (it opens both), DataLoader 0 workers, shuffled, checksums verified (Zarr: "
             "each chunk's crc32c, with readahead; HDF5: the values against the records, no readahead), "
             "steady-state rate as in figure 2, median "
             f"of {ctx.sizes.read_passes} pass(es); {cold_method(ctx)} (an HDF5 export of the figure-1 cache for "
             "the HDF5 reads).", ""]
    lines += table(["storage", "write path", "write s/sample", "MB/sample",
                    *(f"read samples/s {mode}" for mode in modes)], table_rows)
    speedups = {mode: rates[(str(zarr_path), mode)] / rates[(str(h5_path), mode)] for mode in modes}
    return Section("5. Zarr vs HDF5", lines, [Target(f"Zarr / HDF5 read samples/s, {mode}", "report",
                                                      f"{value:.2f}", None) for mode, value in speedups.items()])


def runs_to_break_even(build: float, forward: float, read: float, epochs: int) -> str:
    """Student runs after which the build has cost less than the teacher forwards it saved (s/sample in)."""
    if forward <= read:
        return "never (a cache read costs more than a forward)"
    return f"{build / (epochs * (forward - read)):.3f}"


def figure_cost(ctx: Context) -> Section:
    """Figure 6: runs until the cache has paid for its build, and nuScenes-size cache weight per codec."""
    forward, build, epochs = ctx.forward_s_per_sample, ctx.build_s_per_sample, ctx.epochs
    read_mode = read_modes(ctx)[-1]
    read = 1 / ctx.default_read[read_mode]
    lines = [f"Measured here (CPU, torch threads {torch.get_num_threads()}): teacher forward {forward:.2f} s/sample, "
             f"build {build:.2f} s/sample, default-codec read {read * 1000:.0f} ms/sample ({read_mode}, 0 workers). "
             f"A student run = {epochs} epochs over the dataset (`--epochs`). Online KD pays one teacher forward per "
             "sample per epoch, cached KD one cache read; the cache costs one build. Break-even runs = build / "
             f"({epochs} x (forward - read)) per sample, independent of dataset size. Per-codec read time: warm, "
             "0 workers (figure 2). nuScenes: 28,130 train samples x measured bytes/sample; build hours = 28,130 x "
             "build s/sample on this machine (one process).", ""]
    rows = []
    for name in CODECS:
        per_sample = ctx.codec_bytes[name]
        read_s = 1 / ctx.codec_read[name]["read"]
        rows.append([name, f"{per_sample / 1e6:.2f}", f"{per_sample * NUSCENES_TRAIN_SAMPLES / 1e9:.0f}",
                     f"{read_s * 1000:.0f}", runs_to_break_even(build, forward, read_s, epochs)])
    lines += table(["codec", "MB/sample", "nuScenes train cache GB", "read ms/sample", f"runs to break even "
                    f"({epochs} epochs)"], rows)
    breakeven = runs_to_break_even(build, forward, read, epochs)
    lines += ["", f"Default codec, {read_mode} read: the cache has paid for itself after {breakeven} run(s) of one "
                  f"student; a nuScenes build takes {NUSCENES_TRAIN_SAMPLES * build / 3600:.1f} h here, and each "
                  f"run then saves {NUSCENES_TRAIN_SAMPLES * epochs * (forward - read) / 3600:.1f} h of teacher "
                  "forwards (net of cache reads)."]
    return Section("6. Cost model", lines, [Target("runs to break even (default codec)", "report", breakeven, None)])


class TrainingRun:
    """One variant's model, optimiser and endless batches, stepped on demand."""

    def __init__(self, cfg: Any) -> None:
        from mmdet3d.registry import MODELS
        from mmengine.optim import build_optim_wrapper
        from mmengine.runner import Runner

        torch.manual_seed(0)
        self.model = MODELS.build(cfg.model).train()
        self.optim_wrapper = build_optim_wrapper(self.model, cfg.optim_wrapper)
        # mmengine's iteration-based sampler: no epoch boundary (where a DataLoader refills its
        # prefetch queue from scratch) every few steps of a 6-frame dataset; a real epoch is thousands
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg.sampler = dict(type="InfiniteSampler", shuffle=True)
        self.batches = iter(Runner.build_dataloader(loader_cfg, seed=0))
        self.times: list[float] = []
        self.teacher_times: list[float] = []  # online KD: seconds of each step spent getting the teacher's maps
        if getattr(self.model, "teacher", None) is not None:
            raw_targets = self.model._raw_targets

            def timed_raw_targets(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = raw_targets(*args, **kwargs)
                self.teacher_times.append(time.perf_counter() - start)
                return result

            self.model._raw_targets = timed_raw_targets

    def step(self) -> None:
        """One timed iteration: next batch + ``train_step`` (preprocess, loss, backward, update)."""
        start = time.perf_counter()
        self.model.train_step(next(self.batches), self.optim_wrapper)
        self.times.append(time.perf_counter() - start)


def train_step_times(cfgs: dict[str, Any], warmup: int, steps: dict[str, int]) -> dict[str, list[float]]:
    """Seconds per training iteration of each variant, after ``warmup`` untimed ones each, plus for
    online-KD variants ("<label> / teacher") the seconds of each step spent in the teacher.

    The variants take turns step by step (round robin) instead of running one after the other, so
    slow drifts of the machine (other jobs, clocks) reach every variant alike and cancel in ratios.
    """
    runs = {label: TrainingRun(cfg) for label, cfg in cfgs.items()}
    for round_index in range(warmup + max(steps.values())):
        for label, run in runs.items():
            if round_index < warmup + steps[label]:
                run.step()
    times = {label: run.times[warmup:] for label, run in runs.items()}
    times.update({f"{label} / teacher": run.teacher_times[warmup:] for label, run in runs.items() if run.teacher_times})
    return times


DEMO_TEACHER = (REPO / "configs" / "demo" / "teacher_pillar.py", REPO / "checkpoints" / "demo_teacher_pillar.pth")


RESPONSE_FRAMES = 2  # frames of figure 8 (a response build of the voxel0075 teacher costs several s/frame)


def figure_response(ctx: Context) -> Section:
    """Figure 8: what response and label targets (``--head-outputs``, ``--boxes``) add to a cache: bytes per
    sample next to the features', and build time next to a features-only build of the same frames."""
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.testing import VOXEL_CONFIG

    frames = min(RESPONSE_FRAMES, ctx.sizes.frames)
    demo_options = {"train_dataloader.dataset.data_root": f"{ctx.data_root}/",  # the demo's train set is not wrapped
                    "train_dataloader.dataset.ann_file": "infos.pkl", "train_dataloader.dataset.indices": frames}
    teachers = {"voxel0075 (BEVFusion-lidar sizes, seeded weights)": (
                    VOXEL_CONFIG, str(ctx.checkpoint),
                    {**ctx.cfg_options, "train_dataloader.dataset.dataset.indices": frames}),
                "demo teacher (trained pillar, configs/demo)": (*map(str, DEMO_TEACHER), demo_options)}
    variants = {"features only": {}, "+ heatmap, boxes": {"head_outputs": "heatmap", "boxes": True},
                "+ all head outputs, boxes": {"head_outputs": "all", "boxes": True},
                # what keeping the regression outputs at box centres saves (the default; the same reg targets)
                "+ all head outputs at every cell (--dense-head-outputs), boxes": {
                    "head_outputs": "all", "boxes": True, "dense_head_outputs": True}}
    rows, targets = [], []
    for label, (config, checkpoint, cfg_options) in teachers.items():
        plain_s = None
        for variant, extra in variants.items():
            log(f"response targets: {label}, {variant}")
            out = ctx.work / f"response-{len(rows)}"
            result = build_cache(BuildOptions(config, checkpoint, str(out), layers=LAYERS, cfg_options=cfg_options,
                                              num_workers=BUILD_WORKERS, device="cpu", progress=False, **extra))
            seconds = result.seconds / result.written
            if plain_s is None:
                plain_s = seconds
                rows.append([label, variant, "", "", "", "", f"{seconds:.2f}", ""])
                continue
            cache = FeatureCache(str(out))
            group, n = store.open_group(str(out)), len(cache)

            def chunk_bytes(path: str) -> float:
                return sum(store.chunk_nbytes(group[path], row) or 0 for row in range(n)) / n

            feature_bytes = sum(chunk_bytes(format.feature_path(layer.name)) + (
                chunk_bytes(format.qparams_path(layer.name)) if layer.codec.precision == "int8" else 0)
                for layer in cache.manifest.layers if not layer.is_head_output)
            head_layers = [layer for layer in cache.manifest.layers if layer.is_head_output]
            head_bytes = sum(chunk_bytes(format.feature_path(layer.name)) for layer in head_layers)
            box_bytes = chunk_bytes(format.BOXES_ARRAY)
            boxes_per_sample = statistics.mean(len(cache.read_boxes(row)) for row in range(n))
            share = (head_bytes + box_bytes) / feature_bytes
            rows.append([label, f"{variant} ({len(head_layers)} layers)", f"{feature_bytes / 1e6:.2f}",
                         f"{head_bytes / 1e6:.3f}", f"{box_bytes / 1e3:.1f} ({boxes_per_sample:.0f} boxes)",
                         f"{share:.2%}", f"{seconds:.2f}", f"{seconds / plain_s:.2f}"])
            if config == VOXEL_CONFIG and not extra.get("dense_head_outputs"):  # the target is on the defaults
                targets.append(Target(f"(head outputs + boxes) / feature bytes, BEVFusion-lidar row, {variant}",
                                      "<= 5%", f"{share:.2%}", share <= 0.05))
    lines = [f"{frames} frames, built per teacher in this process one after the other: the feature layers "
             f"({', '.join(LAYERS)}, default codec) alone, then with `--boxes` and `--head-outputs heatmap` or "
             "`all` (CenterHead outputs of every task at their defaults: heatmaps asin8-zstd3, uint8 sigmoid "
             "scores on their arcsine-root grid, within 0.0031, the regression outputs fp16-zstd1 at the cells of box "
             "centres, annotated and the teacher's, where the reg term reads them, 0 elsewhere; once more with "
             "`--dense-head-outputs`, every cell kept; boxes = the decoded predictions after the teacher's own decoder "
             "and NMS). Bytes per sample from "
             "`featcache.store.chunk_nbytes`; boxes: the `boxes` row (capacity x (box fields + score + label), "
             "float32, zstd3; padding compresses away). Time = `BuildResult.seconds` per sample; a response build "
             "also runs the head, its decoder and NMS, which the features-only forward skips. The voxel0075 "
             "weights are seeded, not trained: its maps are noise, which compresses worse than a trained head's "
             "mostly-background heatmaps, and its boxes are as many as its decoder lets through.", ""]
    lines += table(["teacher", "cached", "features MB/sample", "head outputs MB/sample", "boxes KB/sample",
                    "(head + boxes) / features", "build s/sample", "/ features-only"], rows)
    return Section("8. Response and label targets", lines, targets)


def figure_train(ctx: Context) -> Section:
    """Figure 7: cached-KD vs no-KD vs online-KD training step time, same pillar student and batches."""
    from featcache.teacher.build import BuildOptions, build_cache
    from featcache.testing import VOXEL_CONFIG
    from trainer.train import TrainOptions, build_runner_config

    student = str(STUDENT_CONFIG)
    options = {"train_dataloader.dataset.data_root": f"{ctx.data_root}/",
               "train_dataloader.dataset.ann_file": "infos.pkl"}
    if ctx.sizes.train_batch:
        options["train_dataloader.batch_size"] = ctx.sizes.train_batch
    # figure 3's layers plus every head output and the teacher's boxes (the response and label terms' targets),
    # built the same way
    cache, teacher = str(ctx.work / "train-response"), (VOXEL_CONFIG, str(ctx.checkpoint))
    log("train: building the cache of figure 3's layers + head outputs + boxes")
    build_cache(BuildOptions(VOXEL_CONFIG, str(ctx.checkpoint), cache, layers=LAYERS, head_outputs="all", boxes=True,
                             cfg_options=ctx.cfg_options, num_workers=BUILD_WORKERS, device="cpu", progress=False))
    steps, online_steps = ctx.sizes.train_steps, ctx.sizes.online_steps
    no_kd_label, online_label, cached_label = "no KD (--no-distill)", "online KD (voxel0075 teacher), infonce", \
        "cached KD, infonce"
    # every term alone, and a combination, each from the cache
    cached = {"crd": {"crd": 1.0}, "infonce": {"infonce": 1.0}, "mse": {"mse": 1.0}, "pkd": {"pkd": 5.0},
              "heatmap": {"heatmap": 10.0}, "infonce+pkd": {"infonce": 1.0, "pkd": 5.0},
              "heatmap+infonce": {"heatmap": 10.0, "infonce": 1.0}, "heatmap+reg": {"heatmap": 10.0, "reg": 1.0},
              "heatmap+reg+label": {"heatmap": 10.0, "reg": 1.0, "label": 1.0}}
    variants = {no_kd_label: (TrainOptions(student, None, no_distill=True, cfg_options=options), steps),
                **{f"cached KD, {name}": (TrainOptions(student, cache, kd=kd, cfg_options=options), steps)
                   for name, kd in cached.items()},
                online_label: (TrainOptions(student, None, kd={"infonce": 1.0}, cfg_options=options,
                                            online_teacher=teacher), online_steps)}
    cfgs = {label: build_runner_config(train_options) for label, (train_options, _) in variants.items()}
    log("train: " + ", ".join(f"{label} x {count}" for label, (_, count) in variants.items()) + ", round robin")
    times = train_step_times(cfgs, ctx.sizes.warmup_steps, {label: count for label, (_, count) in variants.items()})
    teacher_times = times.pop(f"{online_label} / teacher")
    medians, rows = {label: statistics.median(values) for label, values in times.items()}, []
    for label, values in times.items():
        rows.append([label, len(values), f"{medians[label]:.2f}", f"{min(values):.2f}", f"{max(values):.2f}",
                     f"{medians[label] / medians[no_kd_label]:.2f}"])
    cfg = next(iter(cfgs.values()))
    no_kd, cached_infonce, online = medians[no_kd_label], medians[cached_label], medians[online_label]
    lines = [f"Student {STUDENT_CONFIG.relative_to(REPO)} (CenterPoint pillar, half width) on the {len(ctx.keys)} "
             f"frames, batch {cfg.train_dataloader.batch_size}, its own augmenting train pipeline and DataLoader "
             f"({cfg.train_dataloader.num_workers} worker), cached feature layers paired by name (all 4) for the "
             "feature terms, the six tasks' class heatmaps for `heatmap`, their regression outputs (30 layers) for "
             "`reg`, the teacher's boxes for `label` and reg's teacher peaks, torch threads "
             f"{torch.get_num_threads()}, mmengine's InfiniteSampler (no epoch restarts of the tiny dataset). Step = "
             "next batch + `train_step` (preprocess, loss, backward, update) after "
             f"{ctx.sizes.warmup_steps} untimed warm-up step(s) per variant; the variants take turns step by step "
             "(round robin, the same batches in the same order), so machine drift reaches all alike. The cache holds "
             "figure 3's layers (default codec), the teacher's head outputs (`--head-outputs all`, default codecs) and "
             "boxes (`--boxes`), built here like figure 3's. Cached variants: each feature term and `heatmap` of "
             "`trainer/terms.py` alone (`--kd NAME=W`), infonce+pkd, heatmap+infonce, heatmap+reg and "
             "heatmap+reg+label together (the seeded teacher's boxes are noise: label KD adds those that are "
             "plausible, up to hundreds per scan, to the GT, which makes that variant's target assignment heavier "
             "than a trained teacher's would). Online KD runs the voxel0075 teacher in the training "
             "process on the student's batch, with infonce, compared with the cached infonce variant.", ""]
    lines += table(["variant", "steps", "median s/step", "min", "max", "/ no KD"], rows)
    # What online KD costs over cached KD should be the teacher alone: compare with the time the online
    # steps spent getting the teacher's maps (same process, same batches), and with figure 3's forward.
    # "Within noise" = within the spread (max - min) of the two compared variants' steps.
    batch = cfg.train_dataloader.batch_size
    saved, in_step = online - cached_infonce, statistics.median(teacher_times)
    noise = (max(times[online_label]) - min(times[online_label])) + (max(times[cached_label]) - min(times[cached_label]))
    lines += ["", f"Online - cached (infonce) = {saved:.2f} s/step. The online steps spent {in_step:.2f} s/step (median) "
                  f"getting the teacher's maps (its voxelisation and forward on the batch of {batch}); difference "
                  f"{saved - in_step:+.2f} s, noise (step spread of both variants) {noise:.2f} s. For comparison, "
                  f"figure 3's forward-only run: {ctx.forward_s_per_sample:.2f} s/sample, un-augmented scans, batch 1, "
                  "alone in its process."]
    targets = [Target(f"cached-KD ({name}) / no-KD step time", "<= 1.10",
                      f"{medians[f'cached KD, {name}'] / no_kd:.2f}", medians[f"cached KD, {name}"] / no_kd <= 1.10)
               for name in cached]
    return Section("7. Training step", lines, targets + [
        Target("online-KD / cached-KD step time (infonce)", "report", f"{online / cached_infonce:.2f}", None),
        Target("online - cached step time vs the teacher's time in the online step", f"equal within noise ({noise:.2f} s)",
               f"{saved:.2f} s vs {in_step:.2f} s",
               abs(saved - in_step) <= noise if min(len(times[online_label]), len(times[cached_label])) > 1 else None)])


# In this order: figures 2 and 6 use the codec caches of figure 1, figures 2, 4 and 5 the scale caches.
STEPS: tuple[Callable[[Context], Section | None], ...] = (
    figure_build, figure_storage, measure_codec_reads, make_scale_caches, figure_read, figure_scale, figure_hdf5,
    figure_cost, figure_train, figure_response)


# -- report -----------------------------------------------------------------------------------

def header(ctx: Context, wall_s: float, quick: bool) -> list[str]:
    """Date, machine, versions, sizes, cold-read method, wall time."""
    from featcache.teacher.build import library_versions
    import h5py

    versions = {**library_versions(), "h5py": h5py.__version__, "python": platform.python_version()}
    return [
        "# featcache benchmarks", "",
        f"Generated by `python tools/bench.py{' --quick' if quick else ''}` on "
        f"{datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; every figure below is measured "
        "by that run (do not edit by hand, re-run the script).", "",
        f"- machine: {len(os.sched_getaffinity(0))} cores (nproc), {cpu_model()}, {memory_total_gib():.0f} GiB RAM, "
        f"Linux {platform.release()}; 1-minute load average {ctx.load_at_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end (other jobs may share the machine)",
        "- versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- sizes: {ctx.sizes.frames} real teacher frames (the real nuScenes scan + rigidly transformed copies), "
        f"scale N={ctx.sizes.scale_rows}; {'QUICK smoke-test sizes, not representative' if quick else 'full run'}",
        "- teacher: mmdet3d `centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py` "
        "(BEVFusion-lidar's encoder/backbone/neck), seeded untrained checkpoint with perturbed BN statistics "
        "(tests/lidar_fixtures.teacher_checkpoint, seed 5); layers pts_middle_encoder 256x180x180, "
        "pts_backbone.0 128x180x180, pts_backbone.1 256x90x90, pts_neck.0 512x180x180",
        f"- torch threads {torch.get_num_threads()} (spconv on CPU is deterministic only single-threaded)",
        f"- page cache: warm = after an untimed pass; {cold_method(ctx)}",
        f"- wall time of this run: {wall_s / 60:.1f} min", ""]


def render(ctx: Context, sections: list[Section], wall_s: float, quick: bool) -> str:
    """The whole BENCHMARKS.md text: header, target summary, one section per figure."""
    lines = header(ctx, wall_s, quick)
    summary = [[section.title, target.name, target.goal, target.measured, verdict(target.passed)]
               for section in sections for target in section.targets]
    lines += ["## Targets", ""] + table(["figure", "target", "goal", "measured", "result"], summary) + [""]
    for section in sorted(sections, key=lambda item: item.title):
        lines += [f"## {section.title}", ""] + section.lines + [""]
        if section.targets:
            lines += table(["target", "goal", "measured", "result"],
                           [[t.name, t.goal, t.measured, verdict(t.passed)] for t in section.targets]) + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 3 min)")
    parser.add_argument("--out", default=None,
                        help="report path (default: BENCHMARKS.md in the repo; with --quick: print only)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per student run in the cost model")
    parser.add_argument("--read-jobs", help=argparse.SUPPRESS)  # internal: read measurements in a subprocess
    parser.add_argument("--build-job", help=argparse.SUPPRESS)  # internal: figure 3 in a subprocess
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.read_jobs:
        print(RESULT_MARK + json.dumps(run_read_jobs(json.loads(args.read_jobs))), flush=True)
        return
    if args.build_job:
        from mmengine.logging import MMLogger

        MMLogger.get_instance("featcache-bench", log_level="WARNING")
        print(RESULT_MARK + json.dumps(run_build_job(json.loads(args.build_job))), flush=True)
        return
    from mmengine.logging import MMLogger

    torch.set_num_threads(1)
    MMLogger.get_instance("featcache-bench", log_level="WARNING")  # mmengine's current logger: no dataset tables
    sizes = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    try:
        ctx = prepare(sizes, args.epochs, work)
        sections = []
        for step in STEPS:
            section = step(ctx)
            if section is not None:
                sections.append(section)
                log("\n".join([f"## {section.title}", *section.lines, *(
                    f"{t.name}: {t.measured} (goal {t.goal}) {verdict(t.passed)}" for t in section.targets)]))
        report = render(ctx, sections, time.perf_counter() - START, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out or (None if args.quick else str(REPO / "BENCHMARKS.md"))
    if out:
        Path(out).write_text(report + "\n")
        log(f"wrote {out}")
    else:
        print(report)
    log(f"done in {(time.perf_counter() - START) / 60:.1f} min")


if __name__ == "__main__":
    main()
