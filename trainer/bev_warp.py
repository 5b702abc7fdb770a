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


def warp_teacher_map(teacher: Tensor, teacher_range: Sequence[float], student_hw: tuple[int, int],
                     student_range: Sequence[float], meta: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Teacher map (C, Ht, Wt) on ``teacher_range`` -> (C, Hs, Ws) on the student's augmented grid,
    plus a (Hs, Ws) bool mask of cells that have a source. Cells whose source lies in a GT-pasted
    box (``meta['pasted_boxes_bev']``, cache frame) are masked too: the teacher never saw those
    objects. Identity cases return the map unchanged."""
    height, width = student_hw
    pasted = meta.get("pasted_boxes_bev")
    pasted = None if pasted is None or len(pasted) == 0 else torch.as_tensor(pasted, dtype=torch.float32,
                                                                              device=teacher.device)
    same_grid = tuple(teacher.shape[-2:]) == (height, width) and list(teacher_range) == list(student_range)
    if same_grid and is_identity(meta) and pasted is None:
        return teacher, torch.ones(height, width, dtype=torch.bool, device=teacher.device)
    source = undo_augmentation(bev_cell_centres(student_range, height, width, teacher.device), meta)
    x_min, y_min, x_max, y_max = teacher_range
    normalised = torch.stack([(source[..., 0] - x_min) / (x_max - x_min) * 2 - 1,
                              (source[..., 1] - y_min) / (y_max - y_min) * 2 - 1], dim=-1)
    warped = F.grid_sample(teacher[None].float(), normalised[None], mode="bilinear", padding_mode="zeros",
                           align_corners=False)[0]
    valid = (normalised.abs() <= 1).all(dim=-1)
    if pasted is not None:
        valid &= ~inside_boxes(source, pasted)
    return warped, valid
