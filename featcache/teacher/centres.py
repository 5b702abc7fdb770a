"""Regression head outputs kept only at box centres: the cells a build stores, and its record of them.

Unless --dense-head-outputs, a build zeroes each regression output (``head_layers.REGRESSION_OUTPUTS``)
away from the cells of the sample's box centres (``head_layers.centre_cells``): the centres of its
annotated boxes (every class), with the teacher's own boxes added per sample under --boxes. Zeros
compress to almost nothing, and a student is trained on those cells only. The manifest records where
(``Manifest.regression_cells``), with a digest of the annotated centres, so that a resume with changed
annotations is refused.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from featcache import boxes as boxes_
from featcache import format, head_layers, layout


def bev_range(cfg) -> list[float]:
    """The extent of the teacher's BEV outputs (``format.bev_range`` of its ``point_cloud_range``)."""
    return format.bev_range(cfg.get("point_cloud_range"), "the teacher config",
                            "to place the cells holding box centres, where regression outputs are kept; set it, or "
                            "build with --dense-head-outputs")


class CentreCells:
    """The cells a build keeps of its regression layers: ``annotated`` holds each row's annotated box centres
    (x, y), ``extent`` is the BEV range (:func:`bev_range`), ``teacher_boxes`` whether --boxes adds the
    teacher's own."""

    def __init__(self, annotated: list[np.ndarray], extent: list[float], regression_layers: Sequence[str],
                 teacher_boxes: bool) -> None:
        self.annotated = annotated
        self.extent = extent
        self.regression_layers = list(regression_layers)
        self.teacher_boxes = teacher_boxes

    def record(self) -> dict[str, Any]:
        """Where the regression outputs hold values (``Manifest.regression_cells``)."""
        digest = hashlib.sha256()
        for centres in self.annotated:  # what a changed annotation file changes: the cells kept
            digest.update(np.int64(len(centres)).tobytes() + centres.astype(np.float32).tobytes())
        return {"at": head_layers.CELLS_AT_CENTRES, "margin": head_layers.CENTRE_MARGIN, "teacher_boxes": self.teacher_boxes,
                "annotated_centres_sha256": digest.hexdigest()}

    def stored(self, row: int, features: dict[str, np.ndarray], predicted: boxes_.TeacherBoxes | None,
               layouts: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
        """One sample's layers as the cache stores them: regression outputs zero away from the cells of its
        annotated and teacher boxes' centres, on each layer's grid in its layout (``layouts``, as recorded)."""
        centres = self.annotated[row]
        if predicted is not None and len(predicted):  # all of them: the cache keeps up to --max-boxes
            centres = np.concatenate([centres, predicted.bboxes[:, :2].astype(np.float64)])
        kept: dict[tuple, np.ndarray] = {}
        stored = dict(features)
        for name in self.regression_layers:
            value = features[name]
            recorded = layouts.get(name)
            grid = (tuple(value.shape[-2:]),
                    layout.BevLayout.from_dict(recorded) if recorded is not None else layout.CANONICAL)
            if grid not in kept:
                kept[grid] = head_layers.centre_cells(centres, self.extent, grid[0], layout=grid[1])
            stored[name] = np.where(kept[grid], value, np.zeros((), dtype=value.dtype))
        return stored
