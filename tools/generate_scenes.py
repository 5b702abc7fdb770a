"""Seeded synthetic lidar scenes written as a dataset mmdet3d's own ``NuScenesDataset`` loads.

The command line of ``featcache.scenes.generate_dataset`` (the sensor, the scenes and the output layout are
described there).

Usage: ``python tools/generate_scenes.py --out DIR --train N --val M --seed S [--beams 32] [--range 50]``
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]

from featcache.scenes import generate_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root (data_root for NuScenesDataset)")
    parser.add_argument("--train", type=int, required=True, help="number of training scans")
    parser.add_argument("--val", type=int, required=True, help="number of validation scans")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--beams", type=int, default=32, help="lidar rings (HDL-32E span kept)")
    parser.add_argument("--range", type=float, default=50.0, dest="max_range", help="max return range, m")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = generate_dataset(args.out, args.train, args.val, args.seed, args.beams, args.max_range)
    if summary["generated"]:
        print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
