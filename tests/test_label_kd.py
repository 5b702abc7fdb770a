"""Teacher boxes as the student sees them (trainer.transforms) and label KD (the ``label`` term): moved by
mmdet3d's own box methods with the parameters its augmentations recorded, named in the student's classes,
kept out of GT-paste regions, and added to the GT only where no annotated object is."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from featcache.boxes import TeacherBoxes
from trainer.terms import TermContext, build_term
from trainer.transforms import augment_boxes, teacher_instances


def _boxes():
    from mmdet3d.structures import LiDARInstance3DBoxes

    tensor = torch.tensor([[5.3, -3.1, -1.7, 4.5, 1.9, 1.6, 0.4, 3.0, -1.0],
                           [-12.2, 8.9, -1.5, 4.2, 1.8, 1.5, -2.6, -5.5, 0.5],
                           [14.8, 11.3, -1.2, 9.0, 2.7, 3.2, 1.9, 0.0, 2.0],
                           [-6.6, -14.4, -1.4, 0.7, 0.6, 1.8, -0.9, 1.2, 0.3]])
    return LiDARInstance3DBoxes(tensor, box_dim=9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_teacher_boxes_move_exactly_as_mmdet3d_moves_the_gt(seed):
    from mmdet3d.datasets.transforms import GlobalRotScaleTrans, RandomFlip3D
    from mmdet3d.structures import LiDARPoints

    np.random.seed(seed)
    boxes = _boxes()
    results = {"points": LiDARPoints(torch.zeros(1, 4), points_dim=4), "gt_bboxes_3d": copy.deepcopy(boxes)}
    for step in (GlobalRotScaleTrans(rot_range=[-0.785, 0.785], scale_ratio_range=[0.9, 1.1],
                                     translation_std=[0.5, 0.5, 0.5]),
                 RandomFlip3D(sync_2d=False, flip_ratio_bev_horizontal=0.5, flip_ratio_bev_vertical=0.5)):
        results = step(results)
    meta = {key: value for key, value in results.items() if key not in ("points", "gt_bboxes_3d")}
    moved = augment_boxes(boxes, meta)
    assert torch.allclose(moved.tensor, results["gt_bboxes_3d"].tensor, atol=1e-5)
    assert not torch.allclose(moved.tensor, boxes.tensor, atol=1e-2)  # something moved (the test can fail)
    assert torch.equal(boxes.tensor, _boxes().tensor)  # the input is left as it was


def test_teacher_instances_are_named_in_the_students_classes_and_kept_out_of_pasted_objects():
    stored = TeacherBoxes(bboxes=_boxes().tensor.numpy(), scores=np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32),
                          labels=np.array([0, 1, 2, 0]))
    cache_classes = ("car", "truck", "tram")
    meta = {"transformation_3d_flow": ["T"], "pcd_trans": np.array([0.0, 0.0, 0.0], dtype=np.float32),
            # a pasted object over box 3 (cache frame): the teacher saw other points there
            "pasted_boxes_bev": np.array([[-6.4, -14.0, 1.0, 1.0, 0.0]], dtype=np.float32)}
    instances = teacher_instances(stored, cache_classes, ("truck", "car"), meta, [-20, -20, -5, 20, 20, 3])
    # tram (box 2) has no student class, box 3 collides with the pasted object
    assert instances.labels_3d.tolist() == [1, 0] and instances.scores_3d.tolist() == pytest.approx([0.9, 0.8])
    assert torch.allclose(instances.bboxes_3d.tensor, _boxes().tensor[:2])
    # moved by the augmentation: box 1 leaves the range (ObjectRangeFilter's rule drops it), box 3 stays
    meta = {"transformation_3d_flow": ["T"], "pcd_trans": np.array([0.0, 12.0, 0.0], dtype=np.float32)}
    instances = teacher_instances(stored, cache_classes, ("truck", "car"), meta, [-20, -20, -5, 20, 20, 3])
    assert instances.labels_3d.tolist() == [1, 1] and instances.scores_3d.tolist() == pytest.approx([0.9, 0.6])
    assert instances.bboxes_3d.tensor[:, 1].tolist() == pytest.approx([8.9, -2.4])


def test_label_term_adds_confident_boxes_that_no_gt_box_explains():
    term = build_term("label", TermContext(channels={}), score_thresh=0.5, dedup_distance=1.0)
    gt = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    teacher = torch.tensor([[0.3, 0.4], [5.0, 5.0], [10.0, 11.5], [20.0, 0.0]])
    scores = torch.tensor([0.9, 0.9, 0.8, 0.4])
    # reference: score >= 0.5 and no GT centre within 1 m
    distance = torch.cdist(teacher, gt).min(dim=1).values
    assert term.extra_targets(gt, teacher, scores).tolist() == ((scores >= 0.5) & (distance > 1.0)).tolist() \
        == [False, True, True, False]
    assert term.extra_targets(torch.zeros(0, 2), teacher, scores).tolist() == [True, True, True, False]
    assert term(None) == {}  # no loss of its own
    with pytest.raises(ValueError, match="score_thresh must be in"):
        build_term("label", TermContext(channels={}), score_thresh=1.5)
