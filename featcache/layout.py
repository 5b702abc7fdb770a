"""Which array axis of a cached BEV map is x and which is y, and how featcache finds out.

mmdet3d's own detectors lay BEV maps out as rows = y, columns = x (``PointPillarsScatter``,
``SparseEncoder`` with ``sparse_shape`` (z, y, x), CenterHead's targets); BEVFusion
(``projects/BEVFusion``) as rows = x, columns = y (its voxel op returns (x, y, z) coordinates, its
sparse encoder permutes to (C, X, Y), TransFusionHead draws targets at ``center_int[[1, 0]]``). A map
read in the wrong layout is the scene mirrored across x = y: on a square grid every cell still has a
"target" and nothing warns. So a cache records each BEV layer's :class:`BevLayout`, and the build
finds it from evidence (:func:`layout_scores`): the scan's own points binned on the layer's grid
against where the map is active, under each candidate layout.

The canonical layout (``CANONICAL``, mmdet3d's) is rows = +y, columns = +x, row 0 at y_min and column 0
at x_min. A layout names what the stored array's rows and columns run along (``"+x"``, ``"-y"``...);
``to_canonical`` turns a stored map into the canonical one, ``stored_pixels`` maps canonical pixel
coordinates onto the stored array. Numpy/torch-agnostic, no detector knowledge: part of the storage core.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featcache.errors import ConfigError
from featcache.selectors import parse_layer_items

_AXIS = re.compile(r"^([+-]?)([xy])([+-]?)([xy])$")

#: below this best correlation the evidence says nothing (a constant or empty map)
MIN_SCORE = 0.05
#: the best candidate must beat the next one by this much (correlation units) to be decisive
MIN_MARGIN = 0.02


@dataclass(frozen=True)
class BevLayout:
    """What a stored BEV map's rows and columns run along: ``rows``/``cols`` are ``"+x"``, ``"-x"``,
    ``"+y"`` or ``"-y"`` (``-``: index 0 at the axis' maximum). ``name``: ``"yx"`` (rows = y, mmdet3d),
    ``"xy"`` (rows = x, BEVFusion), ``"-yx"`` (rows = y running downwards)..."""

    rows: str
    cols: str

    def __post_init__(self) -> None:
        axes = {self.rows[-1:], self.cols[-1:]}
        if axes != {"x", "y"} or self.rows[:1] not in "+-" or self.cols[:1] not in "+-" or len(self.rows) != 2 \
                or len(self.cols) != 2:
            raise ConfigError(f"BEV layout rows={self.rows!r}, cols={self.cols!r}: each must be one of +x, -x, +y, -y "
                              "and they must name both axes")

    @classmethod
    def parse(cls, text: str) -> "BevLayout":
        """``"yx"``, ``"xy"``, ``"-yx"``, ``"y-x"``... (rows first; a ``-`` before an axis reverses it)."""
        match = _AXIS.match(str(text).strip())
        if not match or match.group(2) == match.group(4):
            raise ConfigError(f"BEV layout {text!r} is not one of yx (rows = y, mmdet3d), xy (rows = x, BEVFusion), "
                              "or those with an axis reversed (-yx, y-x, -xy, x-y, -y-x, -x-y)")
        return cls(f"{match.group(1) or '+'}{match.group(2)}", f"{match.group(3) or '+'}{match.group(4)}")

    @property
    def name(self) -> str:
        return f"{self.rows.lstrip('+')}{self.cols.lstrip('+')}"

    @property
    def transposed(self) -> bool:
        """Rows run along x (the canonical map is the stored one transposed)."""
        return self.rows[1] == "x"

    @property
    def is_canonical(self) -> bool:
        return self == CANONICAL

    def swapped(self) -> "BevLayout":
        """The layout with rows and columns exchanged (what reading the map transposed amounts to)."""
        return BevLayout(self.cols, self.rows)

    def canonical_hw(self, stored_hw: Sequence[int]) -> tuple[int, int]:
        """(ny, nx): the canonical grid of a stored map of (H, W)."""
        height, width = int(stored_hw[0]), int(stored_hw[1])
        return (width, height) if self.transposed else (height, width)

    def to_canonical(self, array: Any) -> Any:
        """A stored map (..., H, W), numpy or torch, as the canonical (..., ny, nx) map (a view where it can be)."""
        if self.is_canonical:
            return array
        flips = [axis for axis, direction in ((-2, self.rows[0]), (-1, self.cols[0])) if direction == "-"]
        if flips:
            array = np.flip(array, flips) if isinstance(array, np.ndarray) else array.flip(flips)
        return array.swapaxes(-1, -2) if self.transposed else array

    def from_canonical(self, array: Any) -> Any:
        """The inverse of ``to_canonical``."""
        if self.is_canonical:
            return array
        array = array.swapaxes(-1, -2) if self.transposed else array
        flips = [axis for axis, direction in ((-2, self.rows[0]), (-1, self.cols[0])) if direction == "-"]
        if flips:
            array = np.flip(array, flips) if isinstance(array, np.ndarray) else array.flip(flips)
        return array

    def stored_pixels(self, x_pixel: Any, y_pixel: Any, stored_hw: Sequence[int]) -> tuple[Any, Any]:
        """Canonical pixel coordinates (cell (r, c) of the canonical grid centred at x = c, y = r) as the
        stored array's (column, row) coordinates; integer cells map to integer cells."""
        height, width = int(stored_hw[0]), int(stored_hw[1])
        row, col = (x_pixel, y_pixel) if self.transposed else (y_pixel, x_pixel)
        if self.rows[0] == "-":
            row = (height - 1) - row
        if self.cols[0] == "-":
            col = (width - 1) - col
        return col, row

    def to_dict(self) -> dict[str, str]:
        return {"rows": self.rows, "cols": self.cols}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BevLayout":
        return cls(str(data["rows"]), str(data["cols"]))

    def describe(self) -> str:
        def axis(text: str) -> str:
            return f"{text[1]}{' (reversed)' if text[0] == '-' else ''}"
        return f"rows = {axis(self.rows)}, columns = {axis(self.cols)}"


CANONICAL = BevLayout("+y", "+x")  # mmdet3d: rows = y, columns = x
BEVFUSION = BevLayout("+x", "+y")
#: every layout a BEV map can have (the 8 symmetries of a grid), canonical first
CANDIDATES = tuple(BevLayout(rows, cols) for rows, cols in
                   (("+y", "+x"), ("+x", "+y"), ("-y", "+x"), ("+y", "-x"), ("-y", "-x"),
                    ("+x", "-y"), ("-x", "+y"), ("-x", "-y")))


def activity(feature: np.ndarray, max_channels: int = 64) -> np.ndarray:
    """(H, W) float: how far each cell of a (C, H, W) map is from the map's background (per channel, the
    median cell), L1 over at most ``max_channels`` evenly spaced channels. Empty space is the same
    everywhere in a lidar BEV map (zeros after a scatter, the biases' constant after convolutions), so
    the cells that differ are those the points reach."""
    values = np.asarray(feature, dtype=np.float32)
    if values.ndim == 2:
        values = values[None]
    values = values[::max(1, values.shape[0] // max_channels)]
    values = values.reshape(values.shape[0], -1)
    background = np.median(values, axis=1, keepdims=True)
    return np.abs(values - background).sum(axis=0).reshape(feature.shape[-2:])


def occupancy(points_xy: np.ndarray, extent: Sequence[float], hw: Sequence[int]) -> np.ndarray:
    """(ny, nx) float 0/1: the canonical grid cells over ``extent`` [x_min, y_min, x_max, y_max] that hold at
    least one of ``points_xy`` (N, 2, metres)."""
    x_min, y_min, x_max, y_max = (float(value) for value in extent)
    ny, nx = int(hw[0]), int(hw[1])
    points = np.asarray(points_xy, dtype=np.float64)[:, :2]
    cols = np.floor((points[:, 0] - x_min) / (x_max - x_min) * nx).astype(np.int64)
    rows = np.floor((points[:, 1] - y_min) / (y_max - y_min) * ny).astype(np.int64)
    inside = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
    grid = np.zeros(ny * nx, dtype=np.float32)
    grid[rows[inside] * nx + cols[inside]] = 1.0
    return grid.reshape(ny, nx)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r of two arrays' values (0 where either is constant)."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def occupancy_iou(active: np.ndarray, occupied: np.ndarray, valid: np.ndarray | None = None) -> float:
    """IoU of the ``occupied`` cells (0/1) with as many of the most ``active`` cells (``activity``), over the
    ``valid`` cells (all by default): 1 when the map is active exactly where the points are. For a scatter's
    output this is the IoU of its non-zero cells with the occupied ones; for convolved maps, of their most
    active cells."""
    active, occupied = np.asarray(active, dtype=np.float64).ravel(), np.asarray(occupied).ravel() > 0
    if valid is not None:
        keep = np.asarray(valid).ravel().astype(bool)
        active, occupied = active[keep], occupied[keep]
    count = int(occupied.sum())
    if count == 0:
        return 0.0
    top = np.zeros(len(active), dtype=bool)
    top[np.argpartition(-active, count - 1)[:count]] = True
    top &= active > 0  # a cell no more active than the background is not active
    return float((top & occupied).sum() / (top | occupied).sum())


def layout_scores(feature: np.ndarray, points_xy: np.ndarray, extent: Sequence[float]) -> dict[str, float]:
    """Per candidate layout (by name), the correlation between the map's ``activity`` read in that layout
    and the occupancy of the scan's points on the grid that layout implies: high for the layout the map
    really has, near 0 for a layout that mirrors or rotates the scene."""
    active = activity(feature)
    scores, grids = {}, {}
    for layout in CANDIDATES:
        hw = layout.canonical_hw(active.shape)
        if hw not in grids:
            grids[hw] = occupancy(points_xy, extent, hw)
        scores[layout.name] = correlation(layout.to_canonical(active), grids[hw])
    return scores


@dataclass(frozen=True)
class LayoutEvidence:
    """What the scores of one layer say: the best layout, its score, the runner-up's, and whether that is
    decisive (best score >= ``MIN_SCORE`` and ahead of the next by >= ``MIN_MARGIN``)."""

    best: BevLayout
    scores: dict[str, float]

    @property
    def score(self) -> float:
        return self.scores[self.best.name]

    @property
    def runner_up(self) -> tuple[str, float]:
        others = sorted(((score, name) for name, score in self.scores.items() if name != self.best.name), reverse=True)
        return (others[0][1], others[0][0]) if others else ("-", 0.0)

    @property
    def decisive(self) -> bool:
        return self.score >= MIN_SCORE and self.score - self.runner_up[1] >= MIN_MARGIN

    def describe(self) -> str:
        name, score = self.runner_up
        return f"{self.best.name} {self.score:.3f} (next {name} {score:.3f})"


def weigh(scores: dict[str, float]) -> LayoutEvidence:
    best = max(CANDIDATES, key=lambda layout: scores.get(layout.name, float("-inf")))
    return LayoutEvidence(best, dict(scores))


def parse_layout_option(text: str | None) -> dict[str, BevLayout]:
    """``--bev-layout``: ``LAYOUT`` for every BEV layer (key ``"*"``), or ``LAYER=LAYOUT,...`` (a layer, or a
    module for all of its outputs)."""
    every, items = parse_layer_items(text, "--bev-layout", "LAYOUT", ("pts_neck=xy", "xy"))
    if every is not None:
        return {"*": BevLayout.parse(every)}
    return {layer: BevLayout.parse(value) for layer, value in items}


def stated_layout(stated: dict[str, BevLayout], layer: str) -> BevLayout | None:
    """The layout ``--bev-layout`` states for ``layer``: its own entry, its module's (``pts_neck`` for
    ``pts_neck.0``), else the entry for every layer."""
    if layer in stated:
        return stated[layer]
    module = layer
    while "." in module:
        module = module.rsplit(".", 1)[0]
        if module in stated:
            return stated[module]
    return stated.get("*")


def decide_layouts(maps: dict[str, np.ndarray], points_xy: np.ndarray | None, extent: Sequence[float] | None,
                   stated: dict[str, BevLayout] | None = None, where: str = ""
                   ) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """Each BEV map's layout (per layer: ``LayerSpec.layout``'s dict) from one sample's maps (layer -> (C, H, W))
    and its points, the lines that report how each was found, and the warnings (a layer assumed, or stated
    against the evidence).

    A layer's own evidence decides where it is decisive; ``stated`` (``--bev-layout``) overrides it (a
    contradiction is reported); an undecided layer takes the layout its decisive sibling layers agree on,
    else mmdet3d's (rows = y), reported as assumed. Maps that are not (C, H, W) have no layout (None)."""
    stated = stated or {}
    evidence: dict[str, LayoutEvidence] = {}
    can_measure = points_xy is not None and extent is not None and len(points_xy) > 0
    for name, value in maps.items():
        if np.ndim(value) == 3 and can_measure:
            evidence[name] = weigh(layout_scores(value, points_xy, extent))
    decided = {evidence[name].best for name in evidence if evidence[name].decisive}
    consensus = next(iter(decided)) if len(decided) == 1 else None
    layouts: dict[str, dict[str, Any]] = {}
    lines: list[str] = []
    warnings: list[str] = []
    by_siblings: list[str] = []  # regression outputs, for one: active at objects only, they rarely decide alone
    for name, value in maps.items():
        if np.ndim(value) != 3:
            continue
        found = evidence.get(name)
        scores = {} if found is None else {key: round(score, 4) for key, score in found.scores.items()}
        said = stated_layout(stated, name)
        if said is not None:
            layout, how = said, "stated"
            if found is not None and found.decisive and found.best != said:
                warnings.append(f"layer {name}: --bev-layout states {said.name}, but the points{where} agree with "
                             f"{found.describe()}; keeping the stated {said.name}")
        elif found is not None and found.decisive:
            layout, how = found.best, "measured"
        elif consensus is not None:
            layout, how = consensus, "measured (the teacher's other layers)"
            by_siblings.append(f"{name}{'' if found is None else ' (' + found.describe() + ')'}")
        else:
            layout, how = CANONICAL, "assumed"
            reason = ("no points or no point_cloud_range to measure it with" if found is None
                      else f"the points{where} do not decide it ({found.describe()})")
            warnings.append(f"layer {name}: layout assumed {CANONICAL.name} ({CANONICAL.describe()}, mmdet3d's): {reason}; "
                         "if the teacher lays it out otherwise, state it with --bev-layout LAYER=xy")
        layouts[name] = {**layout.to_dict(), "found": how, "evidence": scores}
        if how == "measured" or how == "stated":
            lines.append(f"layer {name}: {layout.name} ({layout.describe()}), {how}"
                         + ("" if found is None else f"; points{where}: {found.describe()}"))
    if by_siblings:
        lines.append(f"{len(by_siblings)} layer(s) whose own evidence{where} is not decisive take {consensus.name}, "
                     f"which the teacher's other layers measured: {'; '.join(by_siblings)}")
    return layouts, lines, warnings
