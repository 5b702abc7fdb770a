"""Figures 2, 4 and 5 of BENCHMARKS.md: the read path against the in-memory decode, flat throughput and
memory from N to 8N rows, and Zarr against its HDF5 export."""
from __future__ import annotations

import time
from typing import Any

from featcache import codecs
from featcache.benchmarks.caches import fp32_bytes
from featcache.benchmarks.common import (CODECS, GLIBC_TUNABLES, Context, Section, Target, cold_method, log,
                                         read_in_subprocess, read_modes, table)
from featcache.benchmarks.machine import directory_bytes, shmem_huge_pages
from featcache.reader import FeatureCache


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
