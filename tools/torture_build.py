"""Crash torture for `featcache build`: kill -9 it at random moments, resume, compare.

Builds a reference cache without interruption, then builds the same cache again while killing
the builder with SIGKILL at random moments (uniform over the time a build takes, so kills land
in model loading, teacher forwards, chunk writes and records updates alike), resuming after
each kill. The final cache must verify and equal the reference sample for sample, stored bytes
included. Prints the counts it achieved.

With ``--nproc 2`` every build runs under torchrun with 2 ranks and a kill hits one random rank
(torchrun then stops the other; whatever survives is killed too). ``--nproc 2,1`` alternates
2-rank and single-process builds, so a cache one world size left part-built is resumed by the
other. The reference is always one uninterrupted single process.

Usage: python tools/torture_build.py --kills 30 --data NUSCENES_LIKE_DIR --checkpoint PILLAR.pth
       --work DIR [--seed 0] [--nproc 2,1]
(the data directory is laid out as featcache.testing.make_nuscenes_like writes it)
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]  # this checkout's featcache, as the other tools

from featcache import format, store  # noqa: E402
from featcache.reader import open_cache  # noqa: E402
from featcache.testing import PILLAR_CONFIG, cfg_option_args, free_port, nus_cfg_options  # noqa: E402
from featcache.verify import verify_cache  # noqa: E402


LAUNCH_MARKER = "FEATCACHE_TORTURE_LAUNCH"


def build_command(data: Path, checkpoint: Path, out: Path, nproc: int = 1) -> list[str]:
    build = ["-m", "featcache.cli", "build", PILLAR_CONFIG, str(checkpoint), "--out", str(out),
             "--layers", "pts_middle_encoder,pts_neck", "--num-workers", "0", *cfg_option_args(nus_cfg_options(data))]
    if nproc == 1:
        return [sys.executable, *build]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), *build]


def launch(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """Start a build whose processes (torchrun's ranks included) :func:`kill_build` can find."""
    env = {**popen_kwargs.pop("env", os.environ), LAUNCH_MARKER: uuid.uuid4().hex}
    process = subprocess.Popen(command, env=env, **popen_kwargs)
    process.marker = env[LAUNCH_MARKER]
    return process


def rank_processes(process: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the live ranks of a torchrun build (empty for a single process). torchrun
    starts each rank in a session of its own, so they are found by the marker they inherit."""
    ranks = {}
    for pid in _launched_pids(process):
        rank = _environ(pid).get("RANK")
        if pid != process.pid and rank is not None:
            ranks[int(rank)] = pid
    return ranks


def kill_build(process: subprocess.Popen, rng: random.Random | None = None, rank: int | None = None) -> str:
    """SIGKILL a build: a single process itself; under torchrun one rank (``rank``, else a random
    one), after which torchrun stops the others. Returns once every process of the build is gone,
    killing what is left after a minute; says what it killed and how the build ended."""
    ranks = rank_processes(process)
    if ranks:
        rank = rank if rank is not None else (rng or random).choice(sorted(ranks))
        victim, what = ranks[rank], f"rank {rank} of {len(ranks)}"
    elif "torch.distributed.run" in process.args:
        victim, what = process.pid, "torchrun before its ranks started"
    else:
        victim, what = process.pid, "the builder"
    _sigkill(victim)
    try:
        process.wait(timeout=60)
        ending = "" if victim == process.pid else f", torchrun then exited {process.returncode}"
    except subprocess.TimeoutExpired:
        _sigkill(process.pid)
        process.wait()
        ending = ", torchrun hung and was killed too"
    leftovers = _launched_pids(process)
    for pid in leftovers:  # e.g. ranks torchrun started just as it was killed
        _sigkill(pid)
    deadline = time.monotonic() + 30
    while _launched_pids(process) and time.monotonic() < deadline:
        time.sleep(0.05)
    if leftovers:
        ending += f", {len(leftovers)} leftover process(es) killed"
    return what + ending


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or a zombie
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _launched_pids(process: subprocess.Popen) -> list[int]:
    """Live (not zombie) processes carrying this launch's marker."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _environ(int(entry)).get(LAUNCH_MARKER) == process.marker:
            try:
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                pids.append(int(entry))
    return pids


def completed(out: Path) -> int:
    return int((open_cache(out).status() == format.STATUS_COMPLETE).sum()) if store.exists(out) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=lambda text: [int(n) for n in text.split(",")], default=[1],
                        help="world sizes of the builds, in turn (2: torchrun with 2 ranks; 2,1: alternate)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reference, tortured = args.work / "reference", args.work / "tortured"

    start = time.monotonic()
    built = subprocess.run(build_command(args.data, args.checkpoint, reference), check=True, capture_output=True,
                           text=True)
    build_seconds = time.monotonic() - start
    total = len(open_cache(reference))
    # the build's own time, without start-up (model loading): a kill meant to land inside the
    # next sample waits a random part of this
    per_sample = float(re.search(r"wrote \d+ samples in ([\d.]+)s", built.stdout).group(1)) / total
    print(f"reference build: {build_seconds:.1f}s ({per_sample:.2f}s per sample after start-up)")
    kills = attempts = mid_build = checked = 0
    resumed = {size: 0 for size in args.nproc}  # builds that started part-built and added samples
    while kills < args.kills:
        nproc = args.nproc[attempts % len(args.nproc)]
        attempts += 1
        already = completed(tortured)
        process = launch(build_command(args.data, args.checkpoint, tortured, nproc),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a quarter of the kills anywhere in the run (start-up included); the rest once a random
        # number of further samples is complete, plus a random part of one sample's time, so they
        # land inside teacher forwards, chunk writes and records updates. Several ranks complete
        # several samples in that time, so their targets stop short enough to leave work undone.
        last_target = total - 1 - 2 * (nproc - 1)
        if rng.random() < 0.25 or already + 1 > last_target:
            delay, target = rng.uniform(0.0, build_seconds), None
        else:
            delay, target = rng.uniform(0.0, per_sample), rng.randrange(already + 1, last_target + 1)
        what = wait_then_kill(process, tortured, target, delay, time.monotonic() + 4 * build_seconds, rng)
        if what is None:
            if process.returncode != 0:
                print(f"build exited {process.returncode} on its own", file=sys.stderr)
                return 1
            print(f"attempt {attempts}: build finished before the kill; starting over")
            subprocess.run(["rm", "-rf", str(tortured)], check=True)
            continue
        kills += 1
        done = completed(tortured)
        resumed[nproc] += 0 < already < total and done > already
        where = "anywhere" if target is None else f"once {target} were complete"
        print(f"kill {kills} ({_world(nproc)}: {what}; {where}, +{delay:.2f}s): {done} samples complete")
        mid_build += 0 < done < total
        if done == total:  # nothing left to interrupt: check it, then start over so kills hit real work
            if not same_as_reference(reference, tortured):
                return 1
            checked += 1
            subprocess.run(["rm", "-rf", str(tortured)], check=True)

    nproc = args.nproc[attempts % len(args.nproc)]
    already = completed(tortured)
    final = subprocess.run(build_command(args.data, args.checkpoint, tortured, nproc), capture_output=True, text=True)
    if final.returncode != 0:
        print(f"the final resume ({_world(nproc)}) exited {final.returncode}:\n{final.stderr[-3000:]}", file=sys.stderr)
        return 1
    resumed[nproc] += 0 < already < total
    if not same_as_reference(reference, tortured):
        return 1
    resumes = ", ".join(f"{count} with {_world(size)}" for size, count in resumed.items())
    print(f"{kills} kills in {attempts} attempts ({mid_build} with the cache part-built); builds that resumed a "
          f"part-built cache and added to it: {resumes}; {checked + 1} resumed caches verified and identical to the "
          f"uninterrupted build ({total} samples each)")
    return 0


def _world(nproc: int) -> str:
    return "1 process" if nproc == 1 else f"{nproc} ranks"


def wait_then_kill(process: subprocess.Popen, out: Path, target: int | None, delay: float, deadline: float,
                   rng: random.Random) -> str | None:
    """SIGKILL the build ``delay`` seconds after ``target`` samples are complete (after start
    when ``target`` is None); says what was killed. None when the build ended first."""
    while target is not None and completed(out) < target:
        if process.poll() is not None:
            return None
        if time.monotonic() > deadline:
            return kill_build(process, rng)
        time.sleep(0.02)
    try:
        process.wait(timeout=delay)
        return None
    except subprocess.TimeoutExpired:
        return kill_build(process, rng)


def same_as_reference(reference: Path, tortured: Path) -> bool:
    """The tortured cache verifies and equals the reference sample for sample, stored bytes included."""
    report = verify_cache(str(tortured))
    if not report.ok:
        print(report.summary(), file=sys.stderr)
        return False
    left, right = open_cache(reference), open_cache(tortured)
    for row, key in enumerate(left.row_keys):
        a, b = left.read_row(row, decode=False), right.read_row(row, decode=False)
        if any(not np.array_equal(a[name], b[name]) for name in a):
            print(f"sample {key} differs from the uninterrupted build", file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
