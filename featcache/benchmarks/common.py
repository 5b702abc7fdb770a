"""What the cache-side figures share: sizes, the run's context, report sections and targets, and the
measurements run in fresh processes (``python -m featcache.benchmarks.jobs``)."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.teacher.models import MVX_LAYERS


REPO = Path(__file__).resolve().parents[2]


CODECS = ("fp32-none", "fp16-zstd1", "fp16-lz4", "bf16-zstd3", "int8-zstd3", "int8-lz4")

LAYERS = MVX_LAYERS  # what a build caches by default from an MVX-style detector (the benchmark teacher)

BUILD_WORKERS = 1  # BuildOptions' default DataLoader workers; the forward-only run uses the same

NUSCENES_TRAIN_SAMPLES = 28130

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


def run_in_subprocess(option: str, job: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m featcache.benchmarks.jobs <option> <job as JSON>`` in a fresh interpreter (its own heap,
    malloc settings and peak RSS) and return what it printed after RESULT_MARK. Its progress lines pass through as
    they come; the rest of its stderr (library warnings) is shown only if it fails."""
    with tempfile.TemporaryFile(mode="w+") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "featcache.benchmarks.jobs", option, json.dumps(job)], env=env,
                                 cwd=REPO,
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
