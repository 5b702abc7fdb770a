"""Before the first step: does each distilled teacher map, read as the trainer reads it, land where the scan is
on the student's grid?

For a few training samples (the student's own pipeline, augmentation included) every pair's cached map is
warped onto the student grid exactly as the distiller warps it (``BevAlignment``, the layer's recorded BEV
layout) and compared with the sample's points binned on the student grid: the IoU of the occupied cells with
as many of the map's most active cells (``featcache.layout.occupancy_iou``) and the correlation of the two.
The same figures under the map's transpose (rows and columns swapped) tell a layout error from a map that is
merely dense: a pair that agrees clearly better transposed, or whose student cells (almost) never see the
teacher's grid, is refused before hours of training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from featcache import layout as layouts
from featcache.errors import ConfigError, FeatcacheError
from trainer.bev_warp import BevAlignment

logger = logging.getLogger("trainer.alignment_check")

#: below this share of student cells with a teacher source the pair is refused
MIN_VALID_FRACTION = 0.05
#: refused when the transposed reading's correlation beats the recorded one's by this much
TRANSPOSED_MARGIN = 0.05
#: channels (evenly spaced) warped and compared per map: where a map is active shows in a few of them
CHANNELS = 16


@dataclass
class PairAgreement:
    """One distilled pair's agreement with the scan, averaged over the samples checked."""

    student_layer: str
    teacher_layer: str
    layout: str  # the teacher layer's layout as read
    iou: float
    correlation: float
    transposed_iou: float
    transposed_correlation: float
    valid_fraction: float

    @property
    def reads_transposed(self) -> bool:
        """The map agrees with the scan clearly better with its rows and columns swapped."""
        return self.transposed_correlation - self.correlation >= TRANSPOSED_MARGIN

    def line(self) -> str:
        return (f"{self.student_layer} <- {self.teacher_layer} (layout {self.layout}): occupancy IoU {self.iou:.3f}, "
                f"correlation {self.correlation:.3f}; transposed {self.transposed_iou:.3f} / "
                f"{self.transposed_correlation:.3f}; {100 * self.valid_fraction:.0f}% of student cells have a target")


def measure(pairs: dict[str, str], teacher_layouts: dict[str, str], samples: Sequence[tuple[np.ndarray, dict, dict]],
            teacher_range: Sequence[float], student_range: Sequence[float],
            student_shapes: dict[str, Sequence[int]]) -> list[PairAgreement]:
    """``samples``: (points (N, >= 2) of the augmented scan, its metainfo, {teacher layer: (C, H, W) float map
    of the cache frame}). The maps of student-side shape ``student_shapes[layer]`` (C, Hs, Ws)."""
    figures: dict[str, list[tuple[float, ...]]] = {}
    for points, meta, maps in samples:
        points_xy = np.asarray(points)[:, :2]
        for s_layer, t_layer in pairs.items():
            hw = tuple(int(size) for size in student_shapes[s_layer][-2:])
            occupied = layouts.occupancy(points_xy, student_range, hw)
            teacher = torch.as_tensor(maps[t_layer]).float()
            teacher = teacher[::max(1, teacher.shape[0] // CHANNELS)]  # activity needs a few channels, not all
            layout = layouts.BevLayout.parse(teacher_layouts.get(t_layer, layouts.CANONICAL.name))
            row = []
            for reading in (layout, layout.swapped()):
                alignment = BevAlignment(teacher_range, tuple(teacher.shape[-2:]), student_range, hw, meta,
                                         teacher_layout=reading)
                valid = alignment.valid.reshape(hw).numpy()
                active = layouts.activity(alignment.warp(teacher).numpy())
                row += [layouts.occupancy_iou(active, occupied, valid),
                        layouts.correlation(active[valid], occupied[valid]) if valid.any() else 0.0]
            row.append(float(valid.mean()))
            figures.setdefault(s_layer, []).append(tuple(row))
    report = []
    for s_layer, rows in figures.items():
        mean = np.mean(np.asarray(rows), axis=0)
        t_layer = pairs[s_layer]
        report.append(PairAgreement(s_layer, t_layer, teacher_layouts.get(t_layer, layouts.CANONICAL.name),
                                    *(float(value) for value in mean)))
    return report


def check(report: Sequence[PairAgreement], where: str, force: bool = False) -> None:
    """Log the report; refuse (ConfigError) pairs read transposed or without targets, unless ``force``."""
    for agreement in report:
        logger.info("alignment check: %s", agreement.line())
    refused = [agreement for agreement in report
               if agreement.reads_transposed or agreement.valid_fraction < MIN_VALID_FRACTION]
    if not refused:
        return
    reasons = []
    for agreement in refused:
        if agreement.valid_fraction < MIN_VALID_FRACTION:
            reasons.append(f"{agreement.student_layer} <- {agreement.teacher_layer}: only "
                           f"{100 * agreement.valid_fraction:.1f}% of the student's cells lie on the teacher's grid "
                           "(the two BEV ranges barely overlap)")
        else:
            reasons.append(f"{agreement.student_layer} <- {agreement.teacher_layer}: the teacher map agrees with the "
                           f"scan better transposed (correlation {agreement.transposed_correlation:.3f} against "
                           f"{agreement.correlation:.3f} as read in layout {agreement.layout})")
    message = (f"{where}: the teacher's maps do not line up with the student's grid: " + "; ".join(reasons) +
               ". Rebuild the cache with the teacher's layout stated (featcache build --bev-layout LAYER=xy|yx), "
               "or check both configs' point_cloud_range; --force-alignment trains anyway")
    if not force:
        raise ConfigError(message)
    logger.warning("%s (forced)", message)


def training_samples(dataset: Any, cache: Any, keys: Sequence[str], layers: Sequence[str], count: int = 2,
                     tries: int = 8) -> list[tuple[np.ndarray, dict, dict]]:
    """The first ``count`` training samples as the check takes them: points and metainfo from the student's
    pipeline, maps decoded from the cache row of the same key. A row that does not read (damaged: training
    stops on it by name, or skips it with --skip-corrupt) is passed over, among the first ``tries``."""
    taken = []
    for index in range(min(tries, len(dataset))):
        try:
            maps = cache.read(keys[index], layers=list(layers))
        except FeatcacheError as exc:
            logger.info("alignment check: sample %r passed over (%s)", keys[index], exc)
            continue
        item = dataset[index]
        points = item["inputs"]["points"]
        points = points.tensor if hasattr(points, "tensor") else points
        taken.append((np.asarray(points)[:, :2], dict(item["data_samples"].metainfo), maps))
        if len(taken) == count:
            break
    if not taken:
        logger.warning("alignment check: none of the first %d training samples reads from the cache; not checked", tries)
    return taken
