"""Measurements that run in a fresh interpreter (their own heap, malloc settings, peak RSS and threads):
``python -m featcache.benchmarks.jobs --read-jobs JSON`` or ``--build-job JSON`` prints its result after
``RESULT_MARK``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.benchmarks.common import BUILD_WORKERS, LAYERS, RESULT_MARK, log
from featcache.benchmarks.reads import run_read_jobs



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


def main(argv: list[str]) -> None:
    """``--read-jobs JSON`` (``reads.run_read_jobs``) or ``--build-job JSON`` (``run_build_job``): the result as
    JSON after ``RESULT_MARK`` on stdout, progress on stderr."""
    option, job = argv
    if option == "--read-jobs":
        print(RESULT_MARK + json.dumps(run_read_jobs(json.loads(job))), flush=True)
        return
    from mmengine.logging import MMLogger

    MMLogger.get_instance("featcache-bench", log_level="WARNING")
    print(RESULT_MARK + json.dumps(run_build_job(json.loads(job))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
