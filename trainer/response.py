"""Teacher regression outputs carried into a training sample's augmented frame (response KD targets).

A cached class heatmap only *moves* with the sample's augmentation (``BevAlignment.warp``). CenterHead's
regression outputs also *change*: after a rotation the same car has another heading and velocity,
after a scaling other extents and height, and its sub-cell centre offset is relative to a cell of
another grid. So each cached output is decoded into the box field it encodes (in the cache frame),
moved through the sample's recorded augmentation exactly as mmdet3d moves a GT box
(``LiDARInstance3DBoxes.rotate / scale / translate / flip``, in ``transformation_3d_flow`` order), and
encoded again the way ``CenterHead.get_targets_single`` encodes that box on the student's grid:

* ``reg`` (offset_x, offset_y): the teacher's predicted centre, cell + offset on the teacher grid ->
  metric -> augmented -> minus the student cell's integer index, in student cells;
* ``height`` (z, the gravity centre): scaled, then translated;
* ``dim`` (log l, log w, log h; or l, w, h without ``norm_bbox``): + log(scale) (x scale);
* ``rot`` (sin, cos of the yaw): yaw + rotation angle; a horizontal flip negates it, a vertical flip
  maps it to pi - yaw;
* ``vel`` (vx, vy): rotated and scaled like a point, negated per flipped axis, never translated.

Torch only, like every loss-side module (tested against mmdet3d's own box ops and target encoding).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from featcache import head_layers

__all__ = ["REGRESSION_KINDS", "augment_points", "augment_yaw", "augment_velocity", "augmented_targets"]

#: CenterHead outputs that encode box fields (everything but the heatmap): the format's list, one owner.
REGRESSION_KINDS = head_layers.REGRESSION_OUTPUTS


def _flow(meta: dict[str, Any]) -> list[str]:
    return list(meta.get("transformation_3d_flow", []))


def _rotation_t(meta: dict[str, Any], like: Tensor) -> Tensor:
    return torch.as_tensor(meta["pcd_rotation"], dtype=like.dtype, device=like.device)[:2, :2]


def _rotation_angle(meta: dict[str, Any]) -> float:
    if meta.get("pcd_rotation_angle") is not None:
        return float(meta["pcd_rotation_angle"])
    rot_t = torch.as_tensor(meta["pcd_rotation"], dtype=torch.float64)  # [[c, s], [-s, c]] for angle a
    return math.atan2(float(rot_t[0, 1]), float(rot_t[0, 0]))


def _move(xy: Tensor, meta: dict[str, Any], translate: bool) -> Tensor:
    for step in _flow(meta):
        if step == "R":
            xy = xy @ _rotation_t(meta, xy)
        elif step == "S":
            xy = xy * float(meta.get("pcd_scale_factor", 1.0))
        elif step == "T" and translate:
            xy = xy + torch.as_tensor(meta.get("pcd_trans", [0.0, 0.0, 0.0]), dtype=xy.dtype, device=xy.device)[:2]
        elif step == "HF":
            xy = torch.stack([xy[..., 0], -xy[..., 1]], dim=-1)
        elif step == "VF":
            xy = torch.stack([-xy[..., 0], xy[..., 1]], dim=-1)
    return xy


def augment_points(xy: Tensor, meta: dict[str, Any]) -> Tensor:
    """Metric BEV points (..., 2) of the cache frame moved into the augmented frame (the inverse of
    ``bev_warp.undo_augmentation``)."""
    return _move(xy, meta, translate=True)


def augment_velocity(velocity: Tensor, meta: dict[str, Any]) -> Tensor:
    """BEV velocities (..., 2) moved like points, never translated."""
    return _move(velocity, meta, translate=False)


def augment_yaw(yaw: Tensor, meta: dict[str, Any]) -> Tensor:
    """Box headings moved as mmdet3d's ``LiDARInstance3DBoxes`` moves them."""
    for step in _flow(meta):
        if step == "R":
            yaw = yaw + _rotation_angle(meta)
        elif step == "HF":
            yaw = -yaw
        elif step == "VF":
            yaw = math.pi - yaw
    return yaw


def _augment_height(z: Tensor, meta: dict[str, Any]) -> Tensor:
    for step in _flow(meta):
        if step == "S":
            z = z * float(meta.get("pcd_scale_factor", 1.0))
        elif step == "T":
            z = z + float(torch.as_tensor(meta.get("pcd_trans", [0.0, 0.0, 0.0]))[2])
    return z


def _scale(meta: dict[str, Any]) -> float:
    return float(meta.get("pcd_scale_factor", 1.0)) if "S" in _flow(meta) else 1.0


def augmented_targets(kind: str, teacher: Tensor, teacher_cells: Tensor, student_cells: Tensor,
                      teacher_range: Sequence[float], teacher_hw: Sequence[int], student_range: Sequence[float],
                      student_hw: Sequence[int], meta: dict[str, Any], log_dims: bool = True) -> Tensor:
    """(N, C) targets in the student's encoding at ``student_cells`` (N, 2: integer x, y of the student
    head grid, augmented frame), from the teacher's ``kind`` output ``teacher`` (N, C) read at
    ``teacher_cells`` (N, 2: integer x, y of the teacher grid, cache frame)."""
    if kind == "reg":
        x_min, y_min, x_max, y_max = teacher_range
        cell_t = teacher.new_tensor([(x_max - x_min) / teacher_hw[1], (y_max - y_min) / teacher_hw[0]])
        centre = teacher.new_tensor([x_min, y_min]) + (teacher_cells.to(teacher.dtype) + teacher) * cell_t
        x_min, y_min, x_max, y_max = student_range
        cell_s = teacher.new_tensor([(x_max - x_min) / student_hw[1], (y_max - y_min) / student_hw[0]])
        return (augment_points(centre, meta) - teacher.new_tensor([x_min, y_min])) / cell_s - student_cells.to(teacher.dtype)
    if kind == "height":
        return _augment_height(teacher, meta)
    if kind == "dim":
        return teacher + math.log(_scale(meta)) if log_dims else teacher * _scale(meta)
    if kind == "rot":
        yaw = augment_yaw(torch.atan2(teacher[:, 0], teacher[:, 1]), meta)
        return torch.stack([torch.sin(yaw), torch.cos(yaw)], dim=1)
    if kind == "vel":
        return augment_velocity(teacher, meta)
    raise ValueError(f"no box field is encoded by head output {kind!r}; regression outputs are {REGRESSION_KINDS}")
