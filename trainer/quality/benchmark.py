"""The quality benchmark's orchestration: scenes and teacher caches prepared, records re-keyed or superseded,
the wanted runs trained ``--jobs`` at a time, the report rewritten after each (``tools/quality.py``)."""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.quality.keys import (adopt_v3, cache_codecs, code_identity, codecs_by_kind, heatmap_bytes_per_value,
                                  legacy_run_key, run_key, sha256, teacher_key, trainer_revision)
from trainer.quality.plan import (CACHE_OUTPUTS, REPO, SCENE_ARGS, TEACHER_CKPT, TEACHER_CONFIG, Run, heatmap_codec_of,
                                  record_run, wanted_runs)
from trainer.quality.report import write_report
from trainer.quality.runs import data_options, evaluate_teacher, load, run_one, save, schedule_options


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def featcache_cli() -> list[str]:
    return [sys.executable, "-m", "trainer.cli"]


def prepare(work: Path, data: Path, quick: bool, heatmap_codec: str | None = None) -> dict[str, Any]:
    """Scenes, teacher cache (its heatmaps in ``heatmap_codec``, default ``head_layers.HEATMAP_CODEC``); returns
    the context every run key includes."""
    subprocess.run([sys.executable, str(REPO / "tools/generate_scenes.py"), "--out", str(data),
                    *SCENE_ARGS["quick" if quick else "full"], "--seed", "0", "--range", "40"],
                   check=True, stdout=subprocess.DEVNULL)
    stamp_text = (data / "featcache_synth_stamp.json").read_text()  # generator, seed and split sizes
    from featcache import format

    return {"teacher_sha256": format.sha256_file(str(TEACHER_CKPT)), "data_stamp": sha256(stamp_text.encode())[:16],
            "trainer_revision": trainer_revision(), **code_identity(), **build_cache(work, data, heatmap_codec)}


def build_cache(work: Path, data: Path, heatmap_codec: str | None) -> dict[str, Any]:
    """Build (or complete) the teacher cache with heatmaps in ``heatmap_codec`` (None: the build's default);
    returns its part of the context: where it is and its codecs."""
    from featcache import head_layers
    from featcache.reader import open_cache

    # named by the head outputs' codecs and where regression outputs are kept ("centres": the build's default,
    # the cells the reg term reads; identical targets there): a cache of older defaults or of another arm stays
    # beside it (a build refuses to resume a cache built differently)
    heatmaps = heatmap_codec or head_layers.HEATMAP_CODEC.name
    cache = work / f"cache_neck_heads_boxes_{heatmaps}_{head_layers.HEAD_OUTPUT_CODEC.name}_centres"
    options = [item for option in data_options(data) for item in ("--cfg-options", option)]
    if heatmap_codec:
        options += ["--codec", f"heatmap={heatmap_codec}"]
    subprocess.run(featcache_cli() + ["build", str(TEACHER_CONFIG), str(TEACHER_CKPT), "--out", str(cache),
                                      *CACHE_OUTPUTS, *options], check=True)
    reader = open_cache(str(cache))
    return {"cache_codecs": cache_codecs(reader), "codecs_by_kind": codecs_by_kind(reader), "cache": str(cache),
            "heatmap_codec": heatmaps, "heatmap_bytes_per_value": heatmap_bytes_per_value(reader)}


def execute(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir)
    state_path = out_dir / "quality.json"
    state = load(state_path)
    work = Path(args.work_dir)
    data = work / "data" if args.quick else REPO / "data/generated/demo"
    context = prepare(work, data, args.quick, args.heatmap_codec)
    log(f"trainer revision {context['trainer_revision']}, cache {context['cache']}")
    contexts = {None: context}
    state["heatmap_caches"] = {context["heatmap_codec"]: context["heatmap_bytes_per_value"]}

    def context_of(run: Run) -> dict[str, Any]:
        """The context of the cache ``run`` reads: the default one, or a heatmap-codec arm's (built once)."""
        codec = heatmap_codec_of(run.targets)
        if codec not in contexts:
            log(f"cache with {codec} heatmaps (a codec arm)")
            contexts[codec] = {**context, **build_cache(work, data, codec)}
            state["heatmap_caches"] = {c["heatmap_codec"]: c["heatmap_bytes_per_value"] for c in contexts.values()}
        return contexts[codec]

    adopted = adopt_v3(state, context_of, args.quick)
    if adopted:
        log(f"key v3: {adopted} records of trainer revision {context['trainer_revision']} keyed v2 now hold the code "
            "identity (featcache, generator, teacher config, libraries)")
    keys = {record_run(r): r for r in state["runs"]}
    current = {}
    for run, record in keys.items():
        key = run_key(run, context_of(run), args.quick)
        if record["key"] == legacy_run_key(run, context_of(run), args.quick):
            record["key"] = key
        if record["key"] == key:
            current[run] = record
        else:
            state["superseded_runs"].append(record)
    state["runs"] = list(current.values())
    # a run of the plan that some record already trained under the same key is taken, not retrained: a
    # superseded record of a run that is current again (a codec arm that was the default), a pilot's
    # (--reuse-records)
    known = {record["key"]: record for record in state["superseded_runs"]}
    for path in args.reuse_records or ():
        known.update({record["key"]: record for record in load(Path(path))["runs"]})
    state["context"] = {key: value for key, value in context.items() if key != "cache"}
    if not state.get("teacher") or state["teacher"].get("key") != teacher_key(context):
        log("evaluating the teacher")
        state["teacher"] = {**evaluate_teacher(data, args.quick), "key": teacher_key(context)}
    save(state_path, state)
    budget = args.max_runs
    while True:
        todo = [run for run in wanted_runs(state["runs"], args.seeds, args.quick, args.only, args.recipes)
                if run not in current]
        todo = list(dict.fromkeys(todo))
        for run in todo:
            record = known.pop(run_key(run, context_of(run), args.quick), None)
            if record is not None:
                if record in state["superseded_runs"]:
                    state["superseded_runs"].remove(record)
                log(f"reused {run.name}: trained as {record_run(record).name} under the same key, mAP {record['mAP']:.4f}")
                current[run] = {**record, **asdict(run)}
        if len(current) > len(state["runs"]):
            state["runs"] = list(current.values())
            save(state_path, state)
            continue
        if budget is not None:
            todo = todo[:max(budget, 0)]
        if not todo:
            break
        batch = todo[:args.jobs]
        log(f"{len(todo)} runs to do; starting {', '.join(run.name for run in batch)}")
        specs = []
        for run in batch:
            key = run_key(run, context_of(run), args.quick)
            specs.append({"run": asdict(run), "key": key, "work_dir": str(work / "runs" / run.name),
                          "cache": context_of(run)["cache"],
                          "cfg_options": data_options(data) + schedule_options(args.quick)})
        # by --jobs, not by this batch's size: a last run alone would get every core, and a run's result
        # depends on its thread count (reduction order), which its key does not hold
        threads = max(1, (os.cpu_count() or 2) // args.jobs)
        failures = []
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            futures = {pool.submit(run_one, spec, threads): spec for spec in specs}
            for future in concurrent.futures.as_completed(futures):
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 - the batch's other runs are still recorded
                    failures.append(exc)
                    log(f"failed {Run(**futures[future]['run']).name}: {exc}")
                    continue
                run = record_run(record)
                current[run] = record
                state["runs"] = list(current.values())
                save(state_path, state)
                write_report(out_dir, state, context, args.quick)
                log(f"done {run.name}: mAP {record['mAP']:.4f} ({record['train_s']:.0f} s)")
        if failures:
            raise failures[0]
        if budget is not None:
            budget -= len(batch)
    write_report(out_dir, state, context, args.quick)
