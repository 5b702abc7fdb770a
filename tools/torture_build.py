"""Crash torture for `featcache build`: kill -9 it at random moments, resume, compare.

Builds a reference cache without interruption, then builds the same cache again while killing
the builder with SIGKILL at random moments (uniform over the time a build takes, so kills land
in model loading, teacher forwards, chunk writes and records updates alike), resuming after
each kill. The final cache must verify and equal the reference sample for sample, stored bytes
included. Prints the counts it achieved.

Usage: python tools/torture_build.py --kills 30 --data NUSCENES_LIKE_DIR --checkpoint PILLAR.pth
       --work DIR [--seed 0]
(the data directory is laid out as tests/lidar_fixtures.make_nuscenes_like writes it)
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from lidar_fixtures import PILLAR_CONFIG, cfg_option_args, nus_cfg_options  # noqa: E402

from featcache import format, store  # noqa: E402
from featcache.reader import open_cache  # noqa: E402
from featcache.verify import verify_cache  # noqa: E402


def build_command(data: Path, checkpoint: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "featcache.cli", "build", PILLAR_CONFIG, str(checkpoint), "--out", str(out),
            "--layers", "pts_middle_encoder,pts_neck", "--num-workers", "0", *cfg_option_args(nus_cfg_options(data))]


def completed(out: Path) -> int:
    return int((open_cache(out).status() == format.STATUS_COMPLETE).sum()) if store.exists(out) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reference, tortured = args.work / "reference", args.work / "tortured"

    start = time.monotonic()
    subprocess.run(build_command(args.data, args.checkpoint, reference), check=True, capture_output=True)
    build_seconds = time.monotonic() - start
    print(f"reference build: {build_seconds:.1f}s")

    total = len(open_cache(reference).keys)
    per_sample = build_seconds / total
    kills = attempts = mid_build = checked = 0
    while kills < args.kills:
        attempts += 1
        already = completed(tortured)
        process = subprocess.Popen(build_command(args.data, args.checkpoint, tortured),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a quarter of the kills anywhere in the run (start-up included); the rest once a random
        # number of further samples is complete, plus a random part of one sample's time, so they
        # land inside teacher forwards, chunk writes and records updates
        if rng.random() < 0.25 or already + 1 >= total:
            delay, target = rng.uniform(0.0, build_seconds), None
        else:
            delay, target = rng.uniform(0.0, per_sample), rng.randrange(already + 1, total)
        if not wait_then_kill(process, tortured, target, delay, deadline=time.monotonic() + 4 * build_seconds):
            if process.returncode != 0:
                print(f"build exited {process.returncode} on its own", file=sys.stderr)
                return 1
            print(f"attempt {attempts}: build finished before the kill; starting over")
            subprocess.run(["rm", "-rf", str(tortured)], check=True)
            continue
        kills += 1
        done = completed(tortured)
        where = "anywhere" if target is None else f"once {target} were complete"
        print(f"kill {kills} ({where}, +{delay:.2f}s): {done} samples complete")
        mid_build += 0 < done < total
        if done == total:  # nothing left to interrupt: check it, then start over so kills hit real work
            if not same_as_reference(reference, tortured):
                return 1
            checked += 1
            subprocess.run(["rm", "-rf", str(tortured)], check=True)

    subprocess.run(build_command(args.data, args.checkpoint, tortured), check=True, capture_output=True)
    if not same_as_reference(reference, tortured):
        return 1
    print(f"{kills} kills in {attempts} attempts ({mid_build} with the cache part-built); {checked + 1} resumed "
          f"caches verified and identical to the uninterrupted build ({total} samples each)")
    return 0


def wait_then_kill(process: subprocess.Popen, out: Path, target: int | None, delay: float, deadline: float) -> bool:
    """SIGKILL ``process`` ``delay`` seconds after ``target`` samples are complete (after start
    when ``target`` is None). False when the process ended first."""
    while target is not None and completed(out) < target:
        if process.poll() is not None or time.monotonic() > deadline:
            return process.poll() is None and _kill(process)
        time.sleep(0.02)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        return _kill(process)


def _kill(process: subprocess.Popen) -> bool:
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def same_as_reference(reference: Path, tortured: Path) -> bool:
    """The tortured cache verifies and equals the reference sample for sample, stored bytes included."""
    report = verify_cache(str(tortured))
    if not report.ok:
        print(report.summary(), file=sys.stderr)
        return False
    left, right = open_cache(reference), open_cache(tortured)
    for row, key in enumerate(left.keys):
        a, b = left.read_row(row, decode=False), right.read_row(row, decode=False)
        if any(not np.array_equal(a[name], b[name]) for name in a):
            print(f"sample {key} differs from the uninterrupted build", file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
