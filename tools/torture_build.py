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

    kills = attempts = 0
    while kills < args.kills:
        attempts += 1
        process = subprocess.Popen(build_command(args.data, args.checkpoint, tortured),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.0, build_seconds)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            print(f"kill {kills} at {delay:.2f}s: {completed(tortured)} samples complete")
            continue
        if process.returncode != 0:
            print(f"build exited {process.returncode} on its own", file=sys.stderr)
            return 1
        # the build finished before the kill: start over so every kill hits a live build
        print(f"attempt {attempts}: build finished before the kill at {delay:.2f}s; starting over")
        subprocess.run(["rm", "-rf", str(tortured)], check=True)

    subprocess.run(build_command(args.data, args.checkpoint, tortured), check=True, capture_output=True)
    report = verify_cache(str(tortured))
    if not report.ok:
        print(report.summary(), file=sys.stderr)
        return 1
    left, right = open_cache(reference), open_cache(tortured)
    for row, key in enumerate(left.keys):
        a, b = left.read_row(row, decode=False), right.read_row(row, decode=False)
        if any(not np.array_equal(a[name], b[name]) for name in a):
            print(f"sample {key} differs from the uninterrupted build", file=sys.stderr)
            return 1
    print(f"{kills} kills in {attempts} attempts; final cache verifies and is identical to the "
          f"uninterrupted build ({len(left.keys)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
