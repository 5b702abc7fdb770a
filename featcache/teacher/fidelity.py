"""``featcache inspect --fidelity``: the teacher run again on cached samples, compared with what the cache decodes.

The comparison itself is the storage core's (``featcache.inspection.fidelity``, which knows no detector); this
module brings the teacher that built the cache back (``Teacher.from_manifest``), checks that its dataset holds the
cache's scans under the same keys, and finds each sample's row in that dataset by key.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

from featcache.inspection import centre_cells_of_row, fidelity
from featcache.reader import FeatureCache
from featcache.teacher.detector import Teacher
from featcache.teacher.samples import annotated_centres, check_sources


class FidelityCheck:
    """The teacher of ``cache`` (its manifest's config and, unless given, checkpoint; ``cfg_options`` on top of the
    build's), ready to compare cached samples with its fp32 output."""

    def __init__(self, cache: FeatureCache, checkpoint: str | None = None,
                 cfg_options: dict[str, Any] | None = None) -> None:
        self.cache = cache
        self.teacher = Teacher.from_manifest(cache.manifest, checkpoint=checkpoint, cfg_options=cfg_options)
        check_sources(cache, self.teacher.dataset)  # the teacher's dataset must hold the same scans under the same keys
        # a cache keeping regression outputs at box centres is compared at those cells only (the only ones it holds)
        self.annotated = annotated_centres(self.teacher.dataset) if cache.manifest.regression_cells else None

    @property
    def at_centres(self) -> bool:
        """Whether regression outputs are compared at the box-centre cells the cache keeps them at."""
        return self.annotated is not None

    def compare(self, rows: Sequence[int]) -> Iterator[tuple[str, str, dict[str, float]]]:
        """Per cache row and layer, ``(sample key, layer, figures)``: cosine, max|err| and max|x| of the decoded
        sample against the teacher's fp32 output (``inspection.fidelity``)."""
        for row in rows:
            key = self.cache.row_keys[row]
            teacher_row = self.teacher.row_of(key)  # by key: the info list may be reordered
            reference = self.teacher.features_of_row(teacher_row)
            cells = (centre_cells_of_row(self.cache, self.annotated[teacher_row], int(row))
                     if self.annotated is not None else None)
            for name, figures in fidelity(self.cache, reference, int(row), cells).items():
                yield key, name, figures

