"""A training sampler that announces upcoming samples to the feature cache (cold-read readahead).

mmengine builds the train sampler from ``train_dataloader.sampler``; ``featcache train`` wraps the
student config's sampler in ``CacheReadaheadSampler``, which yields the same indices in the same
order and has the cache start reading each sample's chunks a few samples before a DataLoader
worker asks for them (``featcache.reader.ReadaheadSampler``).
"""
from __future__ import annotations

from typing import Any, Sequence

from mmdet3d.registry import DATA_SAMPLERS

from featcache import open_cache
from featcache.teacher.samples import item_keys
from featcache.reader import ReadaheadSampler


@DATA_SAMPLERS.register_module()
class CacheReadaheadSampler(ReadaheadSampler):
    """``ReadaheadSampler`` built from an mmengine config.

    Args:
        dataset: the training dataset, wrappers included (mmengine passes it, as to any sampler).
        sampler: config of the wrapped sampler (e.g. ``dict(type='DefaultSampler', shuffle=True)``),
            built with the same dataset and seed.
        cache: location of the cache the dataset's pipeline reads (``PackDetInputsWithCache``).
        layers: the layers the pipeline reads (default: all).
        depth: indices prefetched ahead of the one yielded (see ``ReadaheadSampler``).
        storage_options: fsspec options for URL caches (they are not prefetched).
        seed: passed on to the wrapped sampler (mmengine passes it).
    """

    def __init__(self, dataset: Any, sampler: dict, cache: str, layers: Sequence[str] | None = None, depth: int = 4,
                 storage_options: dict[str, Any] | None = None, seed: int | None = None) -> None:
        inner = DATA_SAMPLERS.build(sampler, default_args=dict(dataset=dataset, seed=seed))
        feature_cache = open_cache(cache, storage_options=storage_options)
        # a sample the cache lacks gets row -1, which prefetch skips; the pipeline reports it by name
        rows = [feature_cache.row_of(key) if key in feature_cache else -1 for key in item_keys(dataset)]
        super().__init__(inner, feature_cache, rows, depth=depth, layers=list(layers) if layers else None)
