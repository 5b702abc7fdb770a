"""A head output as a cache layer: the kinds a detector head predicts densely, the codec each kind
gets unless ``--codec`` names it, and the cells where a regression output holds the teacher's values.

These are facts of the stored format (a reader, ``inspect`` and the trainer ask them of any cache);
finding a head in a model and describing its outputs is the teacher wing's (``featcache.teacher.heads``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from featcache import codecs
from featcache.layout import CANONICAL, BevLayout

#: Everything a CenterHead task predicts densely, in the order its SeparateHead runs them.
CENTERHEAD_OUTPUTS = ("heatmap", "reg", "height", "dim", "rot", "vel")
#: The regression outputs: what a box looks like at the cell holding its centre.
REGRESSION_OUTPUTS = CENTERHEAD_OUTPUTS[1:]

#: Codec of class heatmaps unless ``--codec`` names them: the distillation terms compare sigmoid scores,
#: whose both ends matter (0.001 vs 0.01 on background, 0.9 vs 0.99 on a peak), so the scores themselves
#: are quantised, on their arcsine-root grid (``asin8``: every score within pi/1020, finer near 0 and 1).
#: float16 logits cost ~1.6 bytes a value even compressed (a seeded BEVFusion-size teacher's noise
#: heatmaps: 9% of its feature bytes), and an 8-bit affine grid over a logit range is set by its extreme
#: values. The uniform score grid (``score8``, half asin8's bytes) was the default until the quality
#: pilot: heatmap KD weights each cell by the teacher's score and ~35% of that weight sits on cells
#: scoring 0.002-0.05, where score8's 1/255 steps bias the targets; slim students trained from a score8
#: cache came out below their fp16 twins on all 3 seeds of the pilot, asin8's within seed noise
#: (QUALITY.md's heatmap codec section measures all three on every plan run). A trained head's heatmaps
#: are mostly background, which both store as runs of low codes.
HEATMAP_CODEC = codecs.CodecSpec(precision="asin8", compressor="zstd", level=3)
#: Codec of regression outputs (offsets, heights, log sizes, heading, velocity): float16, ~3 significant
#: digits on each.
HEAD_OUTPUT_CODEC = codecs.CodecSpec(precision="fp16", compressor="zstd", level=1)


#: Regression outputs are stored at box centres only (unless ``--dense-head-outputs``): the ``reg`` term reads
#: each at the cell holding a box centre (a GT box's or a cached teacher box's: CenterHead's own regression
#: loss looks there too) and a seeded BEVFusion-size CenterHead's 60 regression channels cost 56% of its
#: feature bytes dense, at fp16. Kept: the cell of every annotated box of the sample (all classes, whichever
#: the teacher detects: a student may have others) and of every teacher box the cache holds, plus the
#: neighbouring cell where a centre lies within ``CENTRE_MARGIN`` cells of a cell edge, since the trainer
#: finds the cell again through the sample's augmentation and back (float32 round trips move a centre by
#: ~1e-5 cells). Every other cell holds 0, which zstd stores in almost nothing.
CENTRE_MARGIN = 0.01
#: ``LayerSpec.meaning["cells"]`` of a regression output: where it holds the teacher's values.
CELLS_AT_CENTRES, CELLS_DENSE = "box centres", "all"


def centre_cells(centres: np.ndarray, bev_range: Sequence[float], hw: Sequence[int],
                 margin: float = CENTRE_MARGIN, layout: BevLayout = CANONICAL) -> np.ndarray:
    """(H, W) bool: the cells of an output map (stored shape ``hw`` in BEV ``layout``, covering ``bev_range``
    [x_min, y_min, x_max, y_max] metres) holding one of ``centres`` (N, 2: x, y metres), and the neighbour of
    each across an edge within ``margin`` cells. Centres off the grid mark nothing. The cell rule is the
    trainer's (``BevAlignment.teacher_cells_of``): floor of the position in cell units."""
    if not layout.is_canonical:
        return layout.from_canonical(centre_cells(centres, bev_range, layout.canonical_hw(hw), margin))
    height, width = int(hw[0]), int(hw[1])
    kept = np.zeros((height, width), dtype=bool)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if not len(centres):
        return kept
    x_min, y_min, x_max, y_max = (float(value) for value in bev_range)
    u = (centres[:, 0] - x_min) / ((x_max - x_min) / width)
    v = (centres[:, 1] - y_min) / ((y_max - y_min) / height)
    for du in (-margin, margin):
        for dv in (-margin, margin):
            x, y = np.floor(u + du).astype(np.int64), np.floor(v + dv).astype(np.int64)
            on_grid = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            kept[y[on_grid], x[on_grid]] = True
    return kept


def default_codec(kind: str) -> codecs.CodecSpec:
    """The codec a head output of ``kind`` gets unless ``--codec`` names it."""
    return HEATMAP_CODEC if kind == "heatmap" else HEAD_OUTPUT_CODEC
