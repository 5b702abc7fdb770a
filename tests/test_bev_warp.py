"""Warping cached BEV maps into the student's augmented frame, against known geometry."""
from __future__ import annotations

import math

import numpy as np
import torch

from trainer.bev_warp import bev_cell_centres, undo_augmentation, warp_teacher_map

RANGE = [-8.0, -8.0, 8.0, 8.0]


def _rotation_meta(angle: float) -> dict:
    c, s = math.cos(angle), math.sin(angle)
    # mmdet3d LiDAR rotation: points @ rot_mat_T, with rot_mat_T = [[c, s, 0], [-s, c, 0], [0, 0, 1]]
    return {"transformation_3d_flow": ["R", "S", "T"], "pcd_rotation": torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1.0]]),
            "pcd_scale_factor": 1.0, "pcd_trans": np.zeros(3)}


def test_unaugmented_same_grid_is_returned_unchanged():
    teacher = torch.randn(3, 16, 16)
    warped, valid = warp_teacher_map(teacher, RANGE, (16, 16), RANGE, {})
    assert warped is teacher and valid.all()


def test_horizontal_flip_mirrors_y():
    teacher = torch.randn(2, 16, 16)
    warped, valid = warp_teacher_map(teacher, RANGE, (16, 16), RANGE, {"transformation_3d_flow": ["HF"]})
    assert torch.allclose(warped, teacher.flip(1), atol=1e-5) and valid.all()


def test_vertical_flip_mirrors_x():
    teacher = torch.randn(2, 16, 16)
    warped, _ = warp_teacher_map(teacher, RANGE, (16, 16), RANGE, {"transformation_3d_flow": ["VF"]})
    assert torch.allclose(warped, teacher.flip(2), atol=1e-5)


def test_rotation_moves_a_point_feature_with_the_points():
    # a feature at metric (5, 1); the scene rotates by +90 degrees, so the point moves to (-1, 5)
    teacher = torch.zeros(1, 16, 16)
    teacher[0, 9, 13] = 1.0  # cell centre (5.5, 1.5)
    meta = _rotation_meta(math.pi / 2)
    moved = torch.tensor([[5.5, 1.5]]) @ meta["pcd_rotation"][:2, :2]
    assert torch.allclose(undo_augmentation(moved, meta), torch.tensor([[5.5, 1.5]]), atol=1e-5)
    warped, valid = warp_teacher_map(teacher, RANGE, (16, 16), RANGE, meta)
    row, col = divmod(int(warped[0].argmax()), 16)
    assert torch.allclose(bev_cell_centres(RANGE, 16, 16)[row, col], moved[0], atol=1e-4)
    assert valid.all()  # a square grid rotated by 90 degrees stays inside itself


def test_other_extent_and_resolution_keep_metric_positions():
    teacher_range, student_range = [-10.8, -10.8, 10.8, 10.8], [-8.0, -8.0, 8.0, 8.0]
    teacher = torch.zeros(1, 36, 36)  # 0.6 m cells
    teacher[0, 21, 24] = 1.0  # centre (3.9, 2.1)
    warped, valid = warp_teacher_map(teacher, teacher_range, (32, 32), student_range, {})  # 0.5 m cells
    row, col = divmod(int(warped[0].argmax()), 32)
    centre = bev_cell_centres(student_range, 32, 32)[row, col]
    assert torch.allclose(centre, torch.tensor([3.75, 2.25]), atol=1e-4) and valid.all()  # nearest 0.5 m cell


def test_translation_out_of_the_teacher_grid_is_masked():
    meta = {"transformation_3d_flow": ["T"], "pcd_trans": np.array([4.0, 0.0, 0.0])}
    warped, valid = warp_teacher_map(torch.ones(1, 16, 16), RANGE, (16, 16), RANGE, meta)
    assert not valid[:, :4].any() and valid[:, 4:].all()  # student x < -4 comes from x < -8
    assert torch.allclose(warped[0][valid], torch.ones(int(valid.sum())))


def test_gt_pasted_boxes_are_masked_in_the_cache_frame():
    # a pasted car at (4, 0.25), 4 m x 2 m, heading along x; the scene is then flipped (y -> -y)
    meta = {"transformation_3d_flow": ["HF"], "pasted_boxes_bev": np.array([[4.0, 0.25, 4.0, 2.0, 0.0]], "float32")}
    _, valid = warp_teacher_map(torch.ones(1, 16, 16), RANGE, (16, 16), RANGE, meta)
    centres = bev_cell_centres(RANGE, 16, 16)
    # in the student's (flipped) frame the car covers x in [2, 6], y in [-1.25, 0.75]
    expected = ~((centres[..., 0] >= 2) & (centres[..., 0] <= 6) & (centres[..., 1] >= -1.25) & (centres[..., 1] <= 0.75))
    assert torch.equal(valid, expected)
    assert int((~valid).sum()) == 4 * 2  # cell centres x in {2.5 .. 5.5}, y in {-0.5, 0.5}
