"""Per-layer non-zero fractions of the teacher's outputs, the build's check that the teacher produces something.

The build counts each sample's fraction as the teacher computes it, drops an invalid sample's, and at
the end merges every rank's with the figures of earlier runs (group attribute ``featcache_nonzero``,
shown by ``featcache inspect``); a layer (nearly) all zeros in every sample of the run is warned about.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from featcache import format
from featcache.world import World


class NonzeroFractions:
    """Each sample's non-zero fraction per layer this run (of the teacher's float32 output), by key."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[str, float]] = {}

    def count(self, features: dict[str, np.ndarray], keys: Sequence[str]) -> None:
        """Record the fractions of a batch of samples (``features``: layer -> (batch, ...) array)."""
        for name, value in features.items():
            per_sample = value.reshape(value.shape[0], -1)
            fractions = np.count_nonzero(per_sample, axis=1) / max(per_sample.shape[1], 1)
            for key, fraction in zip(keys, fractions):
                self.by_key.setdefault(key, {})[name] = float(fraction)

    def drop(self, key: str) -> None:
        """Forget a sample found invalid when written: the statistics are of valid samples only."""
        self.by_key.pop(key, None)

    def summary(self, world: World, earlier: dict[str, Any], layer_names: Sequence[str], repair: bool
                ) -> tuple[dict[str, dict[str, float]], dict[str, tuple[int, float]]]:
        """Every rank's fractions (collective: every rank calls it), merged with ``earlier`` (the cache's
        recorded figures) per layer of ``layer_names``, and the layers (nearly) all zeros in every sample of
        this run, with that run's sample count and largest fraction. A ``repair`` returns ``earlier`` as it is."""
        mine: dict[str, list[float]] = {}  # per layer, in the order the samples were computed
        for fractions in list(self.by_key.values()):
            for name, fraction in fractions.items():
                mine.setdefault(name, []).append(fraction)
        gathered = [mine]
        if world.size > 1:
            import torch.distributed as dist

            gathered = [None] * world.size
            dist.all_gather_object(gathered, mine)
        this_run: dict[str, list[float]] = {}
        for part in gathered:
            for name, fractions in (part or {}).items():
                this_run.setdefault(name, []).extend(fractions)
        nearly_zero = {name: (len(fractions), max(fractions)) for name, fractions in this_run.items()
                       if fractions and max(fractions) < format.NEAR_ZERO_FRACTION}
        if repair:
            return earlier, nearly_zero
        summary = {}
        for name in layer_names:
            fractions, before = this_run.get(name, []), earlier.get(name) or {}
            count = len(fractions) + int(before.get("samples", 0))
            if not count:
                continue
            total = sum(fractions) + float(before.get("mean", 0.0)) * int(before.get("samples", 0))
            summary[name] = {"samples": count, "mean": total / count,
                             "min": min(fractions + ([before["min"]] if "min" in before else [])),
                             "max": max(fractions + ([before["max"]] if "max" in before else []))}
        return summary, nearly_zero
