"""Read measurements: a cache's rows through a DataLoader as the trainer reads them, and the floors beside
them (hand-off alone, chunk files alone), each timed in steady state."""
from __future__ import annotations

import collections
import functools
import statistics
import time
from typing import Any

import numpy as np
import torch

from featcache import format, handoff, store
from featcache.benchmarks.caches import chunk_bytes, in_memory_decode_rate
from featcache.benchmarks.machine import drop_page_cache, peak_rss_mb
from featcache.reader import FeatureCache, ReadaheadSampler


class CacheRows(torch.utils.data.Dataset):
    """Row i of a cache as the trainer's pipeline reads it (``PackDetInputsWithCache``): what
    ``FeatureCache.read_row_tensors`` returns, ``{layer: (stored tensor, int8 scale/offset tensor or None)}``,
    chunk checksums checked, handed over as is (the pipeline only files the same tensors under its field
    names); the float conversion happens later, on the training device."""

    def __init__(self, location: str) -> None:
        self.cache = FeatureCache(location)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, row: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        return self.cache.read_row_tensors(row)


class FilledRows(torch.utils.data.Dataset):
    """As many items as a cache has rows, each tensors of its layers' stored shapes and dtypes (uint8 for
    int8 codecs) filled with ones: what a DataLoader costs to hand over a sample, without reading or
    decoding. ``reused=False``: fresh tensors, which torch copies into new shared memory to send (its
    default); ``reused=True``: in a worker, tensors in ``featcache.handoff`` buffers, as the reader uses."""

    def __init__(self, location: str, reused: bool = False) -> None:
        cache = FeatureCache(location)
        self.rows, self.reused = len(cache), reused
        self.layers = {layer.name: (layer.shape, layer.codec.storage_dtype) for layer in cache.manifest.layers}

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        if self.reused and torch.utils.data.get_worker_info() is not None:
            tensors = handoff.shared_tensors(list(self.layers.values()))
        else:
            tensors = [torch.from_numpy(np.empty(shape, dtype)) for shape, dtype in self.layers.values()]
        for tensor in tensors:
            tensor.fill_(1)
        return dict(zip(self.layers, tensors))


class ChunkFileRows(torch.utils.data.Dataset):
    """Row i of a local cache as the byte count of its chunk files, read whole: the I/O floor of a read."""

    def __init__(self, location: str) -> None:
        group = store.open_group(location)
        manifest = FeatureCache(location).manifest
        arrays = [group[array.path] for array in manifest.arrays() if array.path != format.BOXES_ARRAY]
        self.location, self.arrays, self.rows = location, arrays, manifest.num_samples

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> int:
        return sum(len(chunk_bytes(self.location, array, row)) for array in self.arrays)


def row_loader(dataset: torch.utils.data.Dataset, workers: int) -> torch.utils.data.DataLoader:
    """One sample per item, shuffled, workers persistent across passes as the training configs have
    them (mmdet3d's and ours): a pass then measures the steady state, not worker start-up. Cache
    rows are sampled through ``ReadaheadSampler``, as ``featcache train`` samples them."""
    sampler: torch.utils.data.Sampler = torch.utils.data.RandomSampler(dataset,
                                                                        generator=torch.Generator().manual_seed(0))
    if isinstance(dataset, CacheRows):
        sampler = ReadaheadSampler(sampler, dataset.cache)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                                       persistent_workers=workers > 0)


def timed_pass(loader: torch.utils.data.DataLoader) -> float:
    """Steady-state samples/s of one pass over a ``row_loader``: from the first round of items
    received (one per worker, which all started together) to the last item."""
    workers = loader.num_workers
    arrivals = [time.perf_counter() for _ in loader]
    first_round = max(workers, 1)
    if len(arrivals) <= first_round:
        raise ValueError(f"a timed pass with {workers} workers needs more than {first_round} samples")
    return (len(arrivals) - first_round) / (arrivals[-1] - arrivals[first_round - 1])


def run_read_jobs(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Run read jobs in this process (see :func:`read_in_subprocess`); returns results and peak RSS."""
    results = []
    for job in jobs:
        if job["kind"] == "decode":
            results.append({"samples_per_s": in_memory_decode_rate(job["cache"], job["passes"])})
            continue
        dataset_type = {"read": CacheRows, "handoff": FilledRows, "files": ChunkFileRows,
                        "handoff-reused": functools.partial(FilledRows, reused=True)}[job["kind"]]
        loader = row_loader(dataset_type(job["cache"]), job["workers"])
        collections.deque(loader, maxlen=0)  # untimed: starts the workers, fills the page cache (dropped when cold)
        rates = []
        for _ in range(job["passes"]):
            if job["mode"] == "cold":
                failure = drop_page_cache()
                if failure:
                    raise RuntimeError(f"cold read requested but the page cache cannot be dropped: {failure}")
                # untimed, another cache: reloads the code pages the drop evicted, not this cache's data
                collections.deque(row_loader(dataset_type(job["primer"]), job["workers"]), maxlen=0)
            rates.append(timed_pass(loader))
        results.append({"samples_per_s": statistics.median(rates), "passes": rates})
    return {"results": results, "peak_rss_mb": peak_rss_mb()}
