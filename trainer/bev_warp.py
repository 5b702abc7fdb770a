"""Bring cached teacher BEV maps into the student's (possibly augmented) BEV frame.

A cache holds the teacher's features of the *un-augmented* scene on the teacher's BEV grid. The
student sees the scene after the train pipeline's GlobalRotScaleTrans / RandomFlip3D, on its own
grid (its own point cloud range and resolution). For every student cell centre x' (metric, in
the augmented frame) the target is the teacher map sampled bilinearly at ``A^-1 x'``, where A is
the sample's recorded augmentation (``transformation_3d_flow`` with ``pcd_rotation``,
``pcd_scale_factor``, ``pcd_trans``, flips). Cells whose source lies outside the teacher's grid
get no target (``valid`` is False there).

Trade-off (see README): the warp moves *where* features are, not what they encode; channels
that encode orientation (heading, box extents along x/y) are not rotated with the scene, so
warped targets for rotated scenes are an approximation. Keeping augmentation on the student
only for small rotations, or caching K augmented views, trades that error for storage.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featcache.layout import CANONICAL, BevLayout


def bev_cell_centres(bev_range: Sequence[float], height: int, width: int, device=None) -> Tensor:
    """(H, W, 2) metric x, y of each cell centre; BEV maps are (C, H=y, W=x) in mmdet3d."""
    x_min, y_min, x_max, y_max = bev_range
    xs = x_min + (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * (x_max - x_min) / width
    ys = y_min + (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * (y_max - y_min) / height
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)


def undo_augmentation(xy: Tensor, meta: dict[str, Any]) -> Tensor:
    """Map metric BEV points (..., 2) of the augmented frame back to the original scene."""
    flow = list(meta.get("transformation_3d_flow", []))
    for step in reversed(flow):
        if step == "HF":  # mmdet3d LiDAR horizontal flip: y -> -y
            xy = torch.stack([xy[..., 0], -xy[..., 1]], dim=-1)
        elif step == "VF":  # vertical flip: x -> -x
            xy = torch.stack([-xy[..., 0], xy[..., 1]], dim=-1)
        elif step == "T":
            trans = torch.as_tensor(meta.get("pcd_trans", [0.0, 0.0, 0.0]), dtype=xy.dtype, device=xy.device)
            xy = xy - trans[:2]
        elif step == "S":
            xy = xy / float(meta.get("pcd_scale_factor", 1.0))
        elif step == "R":
            # points were rotated as p' = p @ R_T; undo with p = p' @ R_T^-1 (R_T is orthonormal)
            rot_t = torch.as_tensor(meta["pcd_rotation"], dtype=xy.dtype, device=xy.device)[:2, :2]
            xy = xy @ rot_t.T
    return xy


def is_identity(meta: dict[str, Any]) -> bool:
    """True when the recorded augmentation leaves the BEV plane unchanged (un-augmented samples)."""
    probe = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, -7.0]])
    return torch.allclose(undo_augmentation(probe, meta), probe, atol=1e-6)


def inside_boxes(xy: Tensor, boxes: Tensor) -> Tensor:
    """(...) bool: which metric BEV points (..., 2) lie inside any box (N, 5: x, y, l, w, yaw)."""
    offset = xy.reshape(-1, 1, 2) - boxes[None, :, :2]
    cos, sin = torch.cos(boxes[:, 4]), torch.sin(boxes[:, 4])
    along = offset[..., 0] * cos + offset[..., 1] * sin
    across = -offset[..., 0] * sin + offset[..., 1] * cos
    inside = (along.abs() <= boxes[:, 2] / 2) & (across.abs() <= boxes[:, 3] / 2)
    return inside.any(dim=1).reshape(xy.shape[:-1])


def boxes_on_grid(bev_range: Sequence[float], height: int, width: int, boxes: Tensor) -> Tensor:
    """(H, W) bool: cells of a BEV grid whose centre lies inside any box (N, 5: x, y, l, w, yaw).

    Equal to ``inside_boxes(bev_cell_centres(...), boxes)``, but each box is tested only on the cells
    of its axis-aligned extent: a nuScenes scan's ~70 boxes cover a few thousand of a 512x512 grid's
    262,144 cells, and the dense test costs more than the student's forward pass.
    """
    x_min, y_min, x_max, y_max = bev_range
    cell_x, cell_y = (x_max - x_min) / width, (y_max - y_min) / height
    mask = torch.zeros(height, width, dtype=torch.bool, device=boxes.device)
    if not len(boxes):
        return mask
    half_x = (boxes[:, 2] * torch.cos(boxes[:, 4]).abs() + boxes[:, 3] * torch.sin(boxes[:, 4]).abs()) / 2
    half_y = (boxes[:, 2] * torch.sin(boxes[:, 4]).abs() + boxes[:, 3] * torch.cos(boxes[:, 4]).abs()) / 2
    # cell c's centre is x_min + (c + 0.5) * cell_x; widen by one cell against rounding at the edges
    col_lo = ((boxes[:, 0] - half_x - x_min) / cell_x - 1.5).ceil().clamp(0, width).long().tolist()
    col_hi = ((boxes[:, 0] + half_x - x_min) / cell_x + 1.5).floor().clamp(0, width).long().tolist()
    row_lo = ((boxes[:, 1] - half_y - y_min) / cell_y - 1.5).ceil().clamp(0, height).long().tolist()
    row_hi = ((boxes[:, 1] + half_y - y_min) / cell_y + 1.5).floor().clamp(0, height).long().tolist()
    centres = bev_cell_centres(bev_range, height, width, boxes.device)
    for index, (r0, r1, c0, c1) in enumerate(zip(row_lo, row_hi, col_lo, col_hi)):
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] |= inside_boxes(centres[r0:r1, c0:c1], boxes[index:index + 1])
    return mask


def gaussian_radius(length: Tensor, width: Tensor, min_overlap: float = 0.1) -> Tensor:
    """CenterNet's radius (cells) within which a box's corners may move and keep IoU >= ``min_overlap``,
    for box sizes in cells (the rule mmdet3d's CenterHead draws its heatmap targets with)."""
    sums, area = length + width, length * width
    r1 = (sums + torch.sqrt(sums ** 2 - 4 * area * (1 - min_overlap) / (1 + min_overlap))) / 2
    r2 = (2 * sums + torch.sqrt((2 * sums) ** 2 - 16 * (1 - min_overlap) * area)) / 2
    b3 = -2 * min_overlap * sums
    r3 = (b3 + torch.sqrt(b3 ** 2 - 16 * min_overlap * (min_overlap - 1) * area)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def gaussian_foreground(bev_range: Sequence[float], height: int, width: int, boxes: Tensor,
                        min_radius: int = 2, min_overlap: float = 0.1) -> Tensor:
    """(H, W) float in [0, 1]: the CenterHead-style Gaussian of every box (N, 5: x, y, l, w, yaw), max over boxes.

    Box centres are exact (sub-cell), radii are ``gaussian_radius`` of the box size in cells, at
    least ``min_radius`` (CenterHead's ``min_radius``), sigma = (2r + 1) / 6 as in
    ``draw_heatmap_gaussian``. Unlike "cell centre inside the box", a pedestrian or a cone on a
    1.28 m grid still weighs a few cells: at that size most small objects contain no cell centre.
    """
    heat = torch.zeros(height, width, device=boxes.device)
    if not len(boxes):
        return heat
    x_min, y_min, x_max, y_max = bev_range
    cell_x, cell_y = (x_max - x_min) / width, (y_max - y_min) / height
    radius = gaussian_radius(boxes[:, 2] / cell_x, boxes[:, 3] / cell_y, min_overlap).floor().clamp_min(min_radius)
    sigma = (2 * radius + 1) / 6
    centre_col = (boxes[:, 0] - x_min) / cell_x - 0.5  # in cell-index units: cell c's centre is at c
    centre_row = (boxes[:, 1] - y_min) / cell_y - 0.5
    cols = torch.arange(width, device=boxes.device, dtype=torch.float32)
    rows = torch.arange(height, device=boxes.device, dtype=torch.float32)
    for index in range(len(boxes)):
        r = int(radius[index])
        c0, c1 = int(centre_col[index].round()) - r, int(centre_col[index].round()) + r + 1
        r0, r1 = int(centre_row[index].round()) - r, int(centre_row[index].round()) + r + 1
        c0, c1, r0, r1 = max(c0, 0), min(c1, width), max(r0, 0), min(r1, height)
        if c1 <= c0 or r1 <= r0:
            continue
        dx = cols[c0:c1] - centre_col[index]
        dy = rows[r0:r1] - centre_row[index]
        blob = torch.exp(-(dy[:, None] ** 2 + dx[None] ** 2) / (2 * sigma[index] ** 2))
        heat[r0:r1, c0:c1] = torch.maximum(heat[r0:r1, c0:c1], blob)
    return heat


class BevAlignment:
    """Where each cell of a student BEV grid (augmented frame) reads the teacher's grid (cache frame).

    For every student cell centre the source point ``A^-1 x'`` (``undo_augmentation``) is located on
    the teacher grid in pixel units of the stored map (cell (r, c) centred at (c, r)), through the
    teacher map's BEV layout (``featcache.layout``: rows = y for mmdet3d's detectors, rows = x for
    BEVFusion): ``teacher_hw`` is the stored map's (H, W), ``teacher_grid`` the same grid as (ny, nx).
    The student's maps are rows = y (mmdet3d's). ``valid`` (Hs*Ws,) marks cells
    whose source lies on the teacher grid and outside every GT-pasted box (``meta['pasted_boxes_bev']``,
    cache frame): only those have a target.

    ``read_matrix`` turns "these student cells, weighted, summed into these rows" into a sparse
    matrix over teacher cells (bilinear taps, grid_sample's border padding and ``align_corners=False``).
    Border, not zero, padding: a valid cell within half a teacher cell of the grid's edge has taps
    beyond the last cell centre, and zero padding would blend zeros into its target there.
    Losses that need the teacher only at sampled cells, box means or one pooled vector read those
    few values through it instead of warping whole maps: at BEVFusion sizes the dense warp of the
    four cached maps costs as much as the student's own step.
    """

    def __init__(self, teacher_range: Sequence[float], teacher_hw: tuple[int, int], student_range: Sequence[float],
                 student_hw: tuple[int, int], meta: dict[str, Any], device: torch.device | None = None,
                 teacher_layout: BevLayout = CANONICAL) -> None:
        self.teacher_hw, self.student_hw = tuple(teacher_hw), tuple(student_hw)
        self.teacher_layout = teacher_layout
        self.teacher_grid = teacher_layout.canonical_hw(self.teacher_hw)
        self.teacher_range, self.student_range, self.meta = list(teacher_range), list(student_range), meta
        source = undo_augmentation(bev_cell_centres(student_range, *student_hw, device), meta).reshape(-1, 2)
        x_min, y_min, x_max, y_max = teacher_range
        height, width = self.teacher_grid
        self.pixels = torch.stack(teacher_layout.stored_pixels((source[:, 0] - x_min) / (x_max - x_min) * width - 0.5,
                                                               (source[:, 1] - y_min) / (y_max - y_min) * height - 0.5,
                                                               self.teacher_hw), dim=-1)
        self.valid = ((source[:, 0] >= x_min) & (source[:, 0] <= x_max)
                      & (source[:, 1] >= y_min) & (source[:, 1] <= y_max))
        pasted = meta.get("pasted_boxes_bev")
        has_pasted = pasted is not None and len(pasted) > 0
        if has_pasted:
            self.valid &= ~inside_boxes(source, torch.as_tensor(pasted, dtype=torch.float32, device=source.device))
        self.identity = (teacher_layout.is_canonical and self.teacher_hw == self.student_hw
                         and list(teacher_range) == list(student_range) and is_identity(meta) and not has_pasted)

    def teacher_cells_of(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher cell under each of ``points`` (N, 2: x, y in student cell units of the augmented
        frame, e.g. box centres): (N, 2) integer x, y of the teacher grid (cache frame, ``teacher_grid``)
        holding each point's source, and (N,) bool, whether that source lies on the teacher grid. Nearest
        cell, not bilinear: what CenterHead's regression outputs at a centre cell mean (``RegressionTerm``);
        ``teacher_flat_index`` finds the cells in the stored map."""
        x_min, y_min, x_max, y_max = self.student_range
        height, width = self.student_hw
        cell_s = points.new_tensor([(x_max - x_min) / width, (y_max - y_min) / height])
        source = undo_augmentation(points.new_tensor([x_min, y_min]) + points * cell_s, self.meta)
        tx_min, ty_min, tx_max, ty_max = self.teacher_range
        t_height, t_width = self.teacher_grid
        cells = ((source - points.new_tensor([tx_min, ty_min]))
                 / points.new_tensor([(tx_max - tx_min) / t_width, (ty_max - ty_min) / t_height])).floor().long()
        on_grid = (cells[:, 0] >= 0) & (cells[:, 0] < t_width) & (cells[:, 1] >= 0) & (cells[:, 1] < t_height)
        return cells, on_grid

    def teacher_flat_index(self, cells: Tensor) -> Tensor:
        """(N,) flat index into the stored teacher map (H*W) of teacher cells (N, 2: integer x, y of
        ``teacher_grid``, as ``teacher_cells_of`` returns them)."""
        col, row = self.teacher_layout.stored_pixels(cells[:, 0], cells[:, 1], self.teacher_hw)
        return row * self.teacher_hw[1] + col

    def warp(self, teacher: Tensor) -> Tensor:
        """The whole teacher map (C, Ht, Wt) resampled onto the student grid (C, Hs, Ws), float32; the
        map itself when nothing moves. Dense: for losses on every cell (MSE); the others read
        through ``read_matrix``."""
        if self.identity:
            return teacher
        return F.grid_sample(teacher[None].float(), self.sampling_grid()[None], mode="bilinear",
                             padding_mode="border", align_corners=False)[0]

    def sampling_grid(self) -> Tensor:
        """(Hs, Ws, 2) source points in grid_sample's normalised coordinates (align_corners=False)."""
        height, width = self.teacher_hw
        scale = torch.tensor([2.0 / width, 2.0 / height], device=self.pixels.device)
        return ((self.pixels + 0.5) * scale - 1).reshape(*self.student_hw, 2)

    def _taps(self, cells: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bilinear taps of the given student cells on the teacher grid, off-grid taps moved to the nearest
        edge cell (border padding, as grid_sample's ``padding_mode="border"``): for each tap, the position
        in ``cells`` it belongs to, its flat teacher cell, its weight."""
        height, width = self.teacher_hw
        # border padding clamps the sampling point itself onto [0, size - 1] (grid_sample's rule)
        pixels = torch.stack([self.pixels[cells, 0].clamp(0, width - 1), self.pixels[cells, 1].clamp(0, height - 1)], -1)
        corner = pixels.floor()
        frac = pixels - corner
        corner = corner.long()
        positions = torch.arange(len(cells), device=cells.device)
        owners, flat, weights = [], [], []
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x, y = corner[:, 0] + dx, corner[:, 1] + dy
            on_grid = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            weight = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
            owners.append(positions[on_grid])
            flat.append(y[on_grid] * width + x[on_grid])
            weights.append(weight[on_grid])
        return torch.cat(owners), torch.cat(flat), torch.cat(weights)

    def read_matrix(self, cells: Tensor, rows: Tensor | None = None, weights: Tensor | None = None,
                    num_rows: int | None = None) -> Tensor:
        """Sparse (num_rows, Ht*Wt) matrix R with R @ teacher.flatten(1).T = sum, per row r, of
        ``weights[k]`` x (teacher bilinearly interpolated at student cell ``cells[k]``'s source) over
        the k with ``rows[k] == r``. Defaults: one row per cell (rows = arange), weights 1."""
        if rows is None:
            rows, num_rows = torch.arange(len(cells), device=cells.device), len(cells)
        owners, flat, tap_weights = self._taps(cells)
        if weights is not None:
            tap_weights = tap_weights * weights[owners]
        height, width = self.teacher_hw
        return torch.sparse_coo_tensor(torch.stack([rows[owners], flat]), tap_weights.float(),
                                       (num_rows, height * width), check_invariants=True).coalesce()

    def splat(self, cell_weights: Tensor) -> Tensor:
        """(Ht*Wt,) teacher-cell weights w_t with teacher.flatten(1) @ w_t = the warped teacher map summed
        over student cells with ``cell_weights`` (Hs*Ws,): the adjoint of the warp, for pooled targets.

        Computed as grid_sample's input gradient for a one-channel map, which is exactly that adjoint
        (its own kernel, on any device), instead of listing four taps for each of the student's cells.
        """
        source = torch.zeros(1, 1, *self.teacher_hw, device=cell_weights.device, requires_grad=True)
        with torch.enable_grad():
            warped = F.grid_sample(source, self.sampling_grid()[None], mode="bilinear", padding_mode="border",
                                   align_corners=False)
            (gradient,) = torch.autograd.grad(warped, source, cell_weights.reshape(warped.shape).float())
        return gradient.flatten()


def warp_teacher_map(teacher: Tensor, teacher_range: Sequence[float], student_hw: tuple[int, int],
                     student_range: Sequence[float], meta: dict[str, Any],
                     teacher_layout: BevLayout = CANONICAL) -> tuple[Tensor, Tensor]:
    """Teacher map (C, Ht, Wt, in ``teacher_layout``) on ``teacher_range`` -> (C, Hs, Ws) on the student's
    augmented grid (rows = y), plus a (Hs, Ws) bool mask of cells that have a source (``BevAlignment.valid``)."""
    alignment = BevAlignment(teacher_range, tuple(teacher.shape[-2:]), student_range, student_hw, meta, teacher.device,
                             teacher_layout)
    return alignment.warp(teacher), alignment.valid.reshape(student_hw)
