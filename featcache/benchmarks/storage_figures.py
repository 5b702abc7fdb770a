"""Figures 1, 3 and 6 of BENCHMARKS.md: what a build costs against the teacher forward, what each codec
stores and keeps, and after how many student runs a cache has paid for itself."""
from __future__ import annotations

import statistics

import numpy as np
import torch

from featcache import codecs, format, store
from featcache.benchmarks.caches import derived_manifest, fp32_bytes, stored_bytes_per_sample, write_cache
from featcache.benchmarks.common import (BUILD_WORKERS, CODECS, NUSCENES_TRAIN_SAMPLES, Context, Section, Target, log,
                                         read_modes, run_in_subprocess, table)
from featcache.reader import FeatureCache


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
