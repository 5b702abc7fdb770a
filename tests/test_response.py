"""Regression response targets (trainer.response, the ``reg`` term) against mmdet3d itself: a "teacher" whose
outputs are CenterHead's own targets for GT boxes in the cache frame, carried through a recorded
augmentation, must give CenterHead's targets of the same boxes moved by mmdet3d's transforms."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from featcache.teacher import models
from lidar_fixtures import REPO
from trainer.bev_warp import BevAlignment
from trainer.response import REGRESSION_KINDS, augment_points, augment_velocity, augment_yaw
from trainer.terms import LayerStep, TermContext, build_term

TEACHER = str(REPO / "configs/demo/teacher_pillar.py")
SLICES = {"reg": slice(0, 2), "height": slice(2, 3), "dim": slice(3, 6), "rot": slice(6, 8), "vel": slice(8, 10)}


@pytest.fixture(scope="module")
def head():
    models.init_mmdet3d_scope()
    return models.build_model(models.load_config(TEACHER)).pts_bbox_head


def _boxes():
    from mmdet3d.structures import LiDARInstance3DBoxes

    # x, y, z (bottom), l, w, h, yaw, vx, vy: cars, a truck, a pedestrian, a barrier, away from the range's edge
    tensor = torch.tensor([[5.3, -3.1, -1.7, 4.5, 1.9, 1.6, 0.4, 3.0, -1.0],
                           [-12.2, 8.9, -1.5, 4.2, 1.8, 1.5, -2.6, -5.5, 0.5],
                           [14.8, 11.3, -1.2, 9.0, 2.7, 3.2, 1.9, 0.0, 2.0],
                           [-6.6, -14.4, -1.4, 0.7, 0.6, 1.8, -0.9, 1.2, 0.3],
                           [2.1, 17.5, -1.6, 0.5, 2.2, 1.0, 3.0, 0.0, 0.0]])
    return LiDARInstance3DBoxes(tensor, box_dim=9), torch.tensor([0, 0, 1, 3, 4])


def _augment(boxes, kind: str):
    from mmdet3d.datasets.transforms import GlobalRotScaleTrans, RandomFlip3D
    from mmdet3d.structures import LiDARPoints

    import numpy as np

    np.random.seed(5)  # GlobalRotScaleTrans draws its translation from numpy; it records what it drew
    steps = {"rotate+scale+translate": [GlobalRotScaleTrans(rot_range=[0.35, 0.35], scale_ratio_range=[1.04, 1.04],
                                                            translation_std=[0.5, 0.5, 0.2])],
             "flips": [RandomFlip3D(sync_2d=False, flip_ratio_bev_horizontal=1.0, flip_ratio_bev_vertical=1.0)],
             "all": [GlobalRotScaleTrans(rot_range=[-0.3, -0.3], scale_ratio_range=[0.96, 0.96],
                                         translation_std=[0.5, 0.5, 0.2]),
                     RandomFlip3D(sync_2d=False, flip_ratio_bev_horizontal=1.0)]}[kind]
    results = {"points": LiDARPoints(torch.zeros(1, 4), points_dim=4), "gt_bboxes_3d": copy.deepcopy(boxes)}
    for step in steps:
        results = step(results)
    if kind != "flips":
        assert np.abs(results["pcd_trans"]).min() > 0.01  # a translation was drawn and recorded
    meta = {key: value for key, value in results.items() if key not in ("points", "gt_bboxes_3d")}
    return results["gt_bboxes_3d"], meta


def _maps(head, boxes, labels, fill: bool):
    """Per task and output kind: (C, H, W) maps holding CenterHead's targets at each box's centre cell; with
    ``fill`` also at the eight cells around it (offsets re-based on each cell, as a teacher predicts them)."""
    from mmengine.structures import InstanceData

    _, anno_boxes, inds, masks = head.get_targets_single(InstanceData(bboxes_3d=boxes, labels_3d=labels))
    width = head.train_cfg["grid_size"][0] // head.train_cfg["out_size_factor"]
    height = head.train_cfg["grid_size"][1] // head.train_cfg["out_size_factor"]
    maps = []
    for anno, ind, mask in zip(anno_boxes, inds, masks):
        task = {kind: torch.zeros(part.stop - part.start, height, width) for kind, part in SLICES.items()}
        for box, cell in zip(anno[mask.bool()], ind[mask.bool()]):
            y, x = int(cell) // width, int(cell) % width
            for dy, dx in ([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)] if fill else [(0, 0)]):
                for kind, part in SLICES.items():
                    value = box[part].clone()
                    if kind == "reg":
                        value -= torch.tensor([dx, dy], dtype=value.dtype)
                    task[kind][:, y + dy, x + dx] = value
        maps.append(task)
    return maps, (height, width)


def _aabb_cells(boxes, bev, hw):
    corners = boxes.corners[..., :2]
    scale = torch.tensor([hw[1] / (bev[2] - bev[0]), hw[0] / (bev[3] - bev[1])])
    cells = (corners - torch.tensor(bev[:2])) * scale
    return torch.cat([cells.min(dim=1).values, cells.max(dim=1).values], dim=1)


@pytest.mark.parametrize("augmentation", ["rotate+scale+translate", "flips", "all"])
def test_teacher_outputs_carried_through_the_augmentation_are_centerheads_targets_of_the_moved_boxes(head,
                                                                                                   augmentation):
    from trainer.targets import TeacherMaps

    boxes, labels = _boxes()
    moved, meta = _augment(boxes, augmentation)
    teacher, hw = _maps(head, boxes, labels, fill=True)  # cache frame
    expected, _ = _maps(head, moved, labels, fill=False)  # what CenterHead asks of the augmented sample
    bev = [-32.0, -32.0, 32.0, 32.0]
    term = build_term("reg", TermContext(channels={}))
    checked = 0
    for task_index, (task_teacher, task_expected) in enumerate(zip(teacher, expected)):
        task_labels = [label for label in labels.tolist() if label in {0: [0], 1: [1], 2: [2, 3], 3: [4, 5]}[task_index]]
        if not task_labels:
            continue
        task_boxes = moved[torch.tensor([label in task_labels for label in labels.tolist()])]
        for kind in REGRESSION_KINDS:
            # the student predicts exactly CenterHead's targets: the term's loss is what its targets differ by
            student = task_expected[kind][None].clone().requires_grad_(True)
            layer = LayerStep(key=f"t{task_index}_{kind}", student=student, teacher=TeacherMaps([task_teacher[kind]]),
                              alignments=[BevAlignment(bev, hw, bev, hw, meta)], valid=torch.ones(1, *hw, dtype=torch.bool),
                              foreground=torch.zeros(1, *hw), boxes=[_aabb_cells(task_boxes, bev, hw)],
                              rows=torch.zeros(1, dtype=torch.long), kind=kind)
            loss = term.layer_loss(layer)
            assert float(loss) < 2e-5, (augmentation, task_index, kind, float(loss))
            # the same teacher read without the augmentation undone is far off (the test can fail)
            layer.alignments = [BevAlignment(bev, hw, bev, hw, {})]
            if kind in ("reg", "rot") or (kind == "vel" and augmentation != "flips" and task_index == 0):
                assert float(term.layer_loss(layer)) > 0.05, (augmentation, task_index, kind)
            checked += 1
    assert checked == 4 * len(REGRESSION_KINDS)


def test_box_fields_move_as_mmdet3d_moves_a_box():
    boxes, _ = _boxes()
    for augmentation in ("rotate+scale+translate", "flips", "all"):
        moved, meta = _augment(boxes, augmentation)
        torch.testing.assert_close(augment_points(boxes.tensor[:, :2], meta), moved.tensor[:, :2], atol=1e-5, rtol=0)
        torch.testing.assert_close(augment_velocity(boxes.tensor[:, 7:9], meta), moved.tensor[:, 7:9], atol=1e-5, rtol=0)
        yaw = augment_yaw(boxes.tensor[:, 6], meta)
        torch.testing.assert_close(torch.stack([yaw.sin(), yaw.cos()]), torch.stack([moved.tensor[:, 6].sin(),
                                                                                     moved.tensor[:, 6].cos()]),
                                   atol=1e-5, rtol=0)
    assert math.isclose(float(augment_yaw(torch.tensor(0.5), {"transformation_3d_flow": ["VF"]})), math.pi - 0.5, rel_tol=1e-6)


@pytest.mark.parametrize("augmentation", ["all"])
def test_reg_term_reads_the_teachers_peaks_like_gt_centres(head, augmentation):
    # the same boxes given as the teacher's predictions (augmented frame, with scores) instead of GT: the term
    # reads the same centre cells, so the teacher's carried outputs again equal CenterHead's targets there;
    # below peak_score nothing is read
    from trainer.targets import TeacherMaps

    boxes, labels = _boxes()
    moved, meta = _augment(boxes, augmentation)
    teacher, hw = _maps(head, boxes, labels, fill=True)
    expected, _ = _maps(head, moved, labels, fill=False)
    bev = [-32.0, -32.0, 32.0, 32.0]
    car = labels == 0
    for kind in REGRESSION_KINDS:
        student = expected[0][kind][None].clone().requires_grad_(True)
        peaks = _aabb_cells(moved[car], bev, hw)
        layer = LayerStep(key=f"car_{kind}", student=student, teacher=TeacherMaps([teacher[0][kind]]),
                          alignments=[BevAlignment(bev, hw, bev, hw, meta)], valid=torch.ones(1, *hw, dtype=torch.bool),
                          foreground=torch.zeros(1, *hw), boxes=[torch.zeros(0, 4)], rows=torch.zeros(1, dtype=torch.long),
                          kind=kind, teacher_boxes=[peaks], teacher_scores=[torch.tensor([0.9, 0.6])])
        assert float(build_term("reg", TermContext(channels={}), peak_score=0.5).layer_loss(layer)) < 2e-5, kind
        # GT and peak on the same centre count once: the same mean
        layer.boxes = [peaks[:1]]
        assert float(build_term("reg", TermContext(channels={}), peak_score=0.5).layer_loss(layer)) < 2e-5, kind
        layer.boxes = [torch.zeros(0, 4)]
        silent = build_term("reg", TermContext(channels={}), peak_score=0.95).layer_loss(layer)
        assert float(silent) == 0.0 and silent.requires_grad
        # a wrong target at a peak shows: the student's map shifted by one everywhere
        layer.student = (student + 1).detach()
        assert float(build_term("reg", TermContext(channels={}), peak_score=0.5).layer_loss(layer)) > 0.9
