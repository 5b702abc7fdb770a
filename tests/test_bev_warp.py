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


# -- reading cached maps where the losses need them (BevAlignment, TeacherMaps) -----------------

from featcache import codecs  # noqa: E402
from trainer.bev_warp import BevAlignment, boxes_on_grid, inside_boxes  # noqa: E402
from trainer.targets import TeacherMaps  # noqa: E402

TEACHER_RANGE, STUDENT_RANGE = [-10.8, -10.8, 10.8, 10.8], [-8.0, -8.0, 8.0, 8.0]


def _augmented_meta() -> dict:
    meta = _rotation_meta(0.3)
    meta.update(transformation_3d_flow=["R", "S", "T", "HF"], pcd_scale_factor=1.07, pcd_trans=np.array([2.5, -1.0, 0]))
    return meta


def _int8_teacher(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher map (C, 18, 18) as the default codec stores it: uint8 values, qparams, and its decoding."""
    generator = torch.Generator().manual_seed(seed)
    features = (torch.randn(6, 18, 18, generator=generator) * torch.logspace(-2, 1, 6)[:, None, None]).numpy()
    stored, qparams = codecs.encode(features, codecs.DEFAULT_CODEC)
    decoded = torch.from_numpy(codecs.decode(stored, codecs.DEFAULT_CODEC, qparams))
    return torch.from_numpy(stored), torch.from_numpy(qparams), decoded


def test_read_matrix_on_stored_int8_equals_decoding_then_warping_every_cell():
    stored, qparams, decoded = _int8_teacher()
    meta = _augmented_meta()
    warped, valid = warp_teacher_map(decoded, TEACHER_RANGE, (20, 20), STUDENT_RANGE, meta)
    assert 0 < int(valid.sum()) < valid.numel()  # the translation moves part of the grid off the teacher's
    alignment = BevAlignment(TEACHER_RANGE, (18, 18), STUDENT_RANGE, (20, 20), meta)
    assert torch.equal(alignment.valid.reshape(20, 20), valid)
    maps = TeacherMaps([stored], codecs.DEFAULT_CODEC, [qparams])
    every_cell = torch.arange(400)
    read = maps.read(0, alignment.read_matrix(every_cell))  # (400, C), zero padding at the edges included
    assert torch.allclose(read, warped.flatten(1).T, atol=1e-5)


def test_weighted_rows_are_box_means_of_the_warped_map():
    stored, qparams, decoded = _int8_teacher(1)
    meta = _augmented_meta()
    warped, _ = warp_teacher_map(decoded, TEACHER_RANGE, (20, 20), STUDENT_RANGE, meta)
    cells = torch.tensor([21, 22, 41, 42, 300, 301, 302])
    owners = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    weights = torch.tensor([0.25] * 4 + [1 / 3] * 3)
    alignment = BevAlignment(TEACHER_RANGE, (18, 18), STUDENT_RANGE, (20, 20), meta)
    means = TeacherMaps([stored], codecs.DEFAULT_CODEC, [qparams]).read(0, alignment.read_matrix(cells, owners, weights, 2))
    flat = warped.flatten(1)
    expected = torch.stack([flat[:, cells[:4]].mean(1), flat[:, cells[4:]].mean(1)])
    assert torch.allclose(means, expected, atol=1e-5)


def test_splat_is_the_adjoint_of_the_warp():
    stored, qparams, decoded = _int8_teacher(2)
    meta = _augmented_meta()
    warped, valid = warp_teacher_map(decoded, TEACHER_RANGE, (20, 20), STUDENT_RANGE, meta)
    cell_weights = torch.rand(400, generator=torch.Generator().manual_seed(3)) * valid.flatten()
    alignment = BevAlignment(TEACHER_RANGE, (18, 18), STUDENT_RANGE, (20, 20), meta)
    teacher_weights = alignment.splat(cell_weights)
    pooled = TeacherMaps([stored], codecs.DEFAULT_CODEC, [qparams]).weighted_sum(0, teacher_weights)
    assert torch.allclose(pooled, warped.flatten(1) @ cell_weights, rtol=1e-4, atol=1e-4)
    float_maps = TeacherMaps([decoded])  # an online teacher's float maps: no codec
    assert torch.allclose(float_maps.weighted_sum(0, teacher_weights), pooled, rtol=1e-4, atol=1e-4)


def test_boxes_on_grid_equals_the_dense_test():
    generator = torch.Generator().manual_seed(4)
    boxes = torch.cat([torch.rand(40, 2, generator=generator) * 24 - 12,  # some centres off the grid
                       torch.rand(40, 2, generator=generator) * 5 + 0.3,
                       torch.rand(40, 1, generator=generator) * 6.3], dim=1)
    dense = inside_boxes(bev_cell_centres(STUDENT_RANGE, 64, 48), boxes)
    assert dense.any() and not dense.all()
    assert torch.equal(boxes_on_grid(STUDENT_RANGE, 64, 48, boxes), dense)
    assert not boxes_on_grid(STUDENT_RANGE, 64, 48, torch.zeros(0, 5)).any()
