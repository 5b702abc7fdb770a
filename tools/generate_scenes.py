"""Seeded synthetic lidar scenes written as a dataset mmdet3d's own ``NuScenesDataset`` loads.

Each scan is ray-cast from a spinning HDL-32E-like sensor at the origin of the LIDAR frame
(nuScenes' LIDAR_TOP sits 1.84 m above the road) into a street scene: an undulating ground
height field, labelled oriented boxes (nuScenes classes, sizes and label ids) and unlabelled
clutter (building facades, poles, foliage made of ellipsoid clusters). Every ray keeps its
first hit only, so density falls with range, objects shadow each other and faces turned away
from the sensor get no returns.

Output layout (what ``NuScenesDataset`` with ``data_prefix=dict(pts='samples/LIDAR_TOP')`` reads)::

    OUT/samples/LIDAR_TOP/<name>.pcd.bin    float32 x, y, z, intensity (0-255), ring (beam index)
    OUT/nuscenes_infos_{train,val}.pkl      mmdet3d v2 infos: {'metainfo', 'data_list'}

Annotation conventions, taken from mmdet3d's NuScenesDataset and the real v2 info pkl:
``bbox_3d`` is [x, y, z, l, w, h, yaw] in the LIDAR frame with z at the box's *gravity centre*
(NuScenesDataset builds its boxes with ``origin=(0.5, 0.5, 0.5)``), l along the heading and yaw
counter-clockwise from +x. ``num_lidar_pts`` is the number of returns from the object, which
equals the points inside its box (see ``INSET``). Boxes that no ray reaches are dropped from
the annotations: NuScenesDataset would filter them anyway (``num_lidar_pts > 0``), and dropping
them keeps the pkl identical to what a model trains on.

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
