"""An mmdet3d dataset paired with a cache's rows by sample key: the cached targets next to the inputs."""
from __future__ import annotations

import torch

from featcache.reader import FeatureCache
from featcache.teacher.samples import check_sources, dataset_keys


class CachedTargetsDataset(torch.utils.data.Dataset):
    """Pairs an mmdet3d dataset's items with their cached targets, by sample key (never position).

    ``dataset[i]`` is whatever the dataset's pipeline returns; the targets are those of the cache
    row whose key is ``sample_key(dataset.get_data_info(i))``. Yields ``(item, {layer: tensor})``.
    Keys are resolved up front, so a dataset sample missing from the cache is an error at
    construction, naming it, not mid-epoch.
    """

    def __init__(self, dataset, cache: FeatureCache, layers: list[str] | None = None) -> None:
        self.dataset, self.cache, self.layers = dataset, cache, cache._check_layers(layers)
        self.rows = [cache.row_of(key) for key in dataset_keys(dataset)]
        check_sources(cache, dataset)  # the same key must name the same scan

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        targets = self.cache.read_row(self.rows[index], self.layers)
        return self.dataset[index], {name: torch.from_numpy(value) for name, value in targets.items()}
