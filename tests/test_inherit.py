"""`--init-from-teacher`: the demo students start from the trained demo teacher's weights sliced to their
widths (trainer.inherit), the concatenated neck levels sliced per level."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from featcache.teacher import models
from featcache.errors import ConfigError
from lidar_fixtures import REPO
from trainer.inherit import concat_groups, inherit_from_teacher, inherit_weights

TEACHER = str(REPO / "configs/demo/teacher_pillar.py")
TEACHER_CKPT = str(REPO / "checkpoints/demo_teacher_pillar.pth")


def _build(config: str, checkpoint: str | None = None) -> nn.Module:
    models.init_mmdet3d_scope()
    return models.build_model(models.load_config(config), checkpoint)


@pytest.mark.parametrize("student_config", ["configs/demo/student_half.py", "configs/demo/student_slim.py"])
def test_students_take_the_teachers_first_channels_and_each_neck_levels_own(student_config):
    teacher = _build(TEACHER, TEACHER_CKPT)
    student = _build(str(REPO / student_config))
    before = {name: value.clone() for name, value in student.state_dict().items()}
    report = inherit_from_teacher(student, TEACHER, TEACHER_CKPT)
    assert not report.kept and report.sliced and report.copied
    state, source = student.state_dict(), teacher.state_dict()
    for name in report.copied:
        assert torch.equal(state[name], source[name]), name
    # the backbone's first stage: a conv of (16, 32/.. in) out of (32, 32/..), and its BN statistics
    conv = "pts_backbone.blocks.0.0.weight"
    assert conv in report.sliced
    out_s, in_s = state[conv].shape[:2]
    assert torch.equal(state[conv], source[conv][:out_s, :in_s])
    assert torch.equal(state["pts_backbone.blocks.0.1.running_var"], source["pts_backbone.blocks.0.1.running_var"][:out_s])
    # the head reads SECONDFPN's three concatenated 64-channel levels: each student level its teacher level
    shared = "pts_bbox_head.shared_conv.conv.weight"
    assert concat_groups(student, teacher) == {shared: ([32, 32, 32], [64, 64, 64])}
    expected = torch.cat([source[shared][:, start:start + 32] for start in (0, 64, 128)], dim=1)[:state[shared].shape[0]]
    assert torch.equal(state[shared], expected) and not torch.equal(state[shared], source[shared][:, :96][:len(expected)])
    assert any(not torch.equal(before[name], state[name]) for name in report.sliced)


def test_a_student_of_the_teachers_own_widths_becomes_the_teacher():
    teacher = _build(TEACHER, TEACHER_CKPT).eval()
    student = _build(TEACHER).eval()
    report = inherit_from_teacher(student, TEACHER, TEACHER_CKPT)
    assert not report.sliced and not report.kept
    torch.manual_seed(0)
    bev = torch.randn(1, 32, 200, 200)
    with torch.no_grad():
        ours, theirs = student.pts_neck(student.pts_backbone(bev)), teacher.pts_neck(teacher.pts_backbone(bev))
    assert torch.equal(ours[0], theirs[0])


def test_inheritance_slices_narrower_tensors_keeps_what_the_teacher_cannot_give_and_refuses_a_stranger():
    student = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 9))
    teacher_state = {"0.weight": torch.arange(24.0).reshape(6, 4), "0.bias": torch.arange(6.0),
                     "1.weight": torch.arange(12.0).reshape(2, 6), "1.bias": torch.tensor([5.0, 7.0]),
                     "2.weight": torch.ones(5, 2)}  # narrower than the student's: nothing to slice
    kept_before = student[2].weight.clone()
    report = inherit_weights(student, teacher_state)
    assert report.sliced == ["0.weight", "0.bias", "1.weight"] and report.copied == ["1.bias"]
    assert report.kept == ["2.weight", "2.bias"]
    assert torch.equal(student[0].weight, teacher_state["0.weight"][:3]) and torch.equal(student[0].bias, torch.arange(3.0))
    assert torch.equal(student[1].weight, teacher_state["1.weight"][:, :3])
    assert torch.equal(student[2].weight, kept_before)
    assert "1 of 6 tensors copied, 3 sliced" in report.summary() and "2 kept (e.g. 2.weight, 2.bias)" in report.summary()
    with pytest.raises(ConfigError, match="shares no tensor name with the student"):
        inherit_from_teacher(nn.Linear(2, 2), TEACHER, TEACHER_CKPT)


def test_a_student_on_another_voxel_grid_cannot_inherit_and_is_told_what_to_do():
    student = _build(str(REPO / "configs/demo/student_coarse.py"))
    before = {name: value.clone() for name, value in student.state_dict().items()}
    with pytest.raises(ConfigError, match=r"teacher voxelises at \[0.32, 0.32, 8.0\] m .* the student at "
                                          r"\[0.4, 0.4, 8.0\] m .* train it without --init-from-teacher"):
        inherit_from_teacher(student, TEACHER, TEACHER_CKPT)
    assert all(torch.equal(before[name], value) for name, value in student.state_dict().items())  # nothing copied


def test_featcache_train_inherits_before_the_first_step(tmp_path):
    from trainer.train import TrainOptions, _runner_class, build_runner_config

    options = TrainOptions(str(REPO / "configs/demo/student_half.py"), None, work_dir=str(tmp_path / "work"),
                           no_distill=True, init_from_teacher=(TEACHER, TEACHER_CKPT))
    cfg = build_runner_config(options)
    assert cfg.init_from_teacher == {"config": TEACHER, "checkpoint": TEACHER_CKPT}
    runner = _runner_class().from_cfg(cfg)
    runner._init_model_weights()
    source = _build(TEACHER, TEACHER_CKPT).state_dict()
    state = runner.model.state_dict()
    name = "pts_backbone.blocks.1.0.weight"
    assert torch.equal(state[name], source[name][:state[name].shape[0], :state[name].shape[1]])
    assert torch.equal(state["pts_voxel_encoder.pfn_layers.0.linear.weight"],
                       source["pts_voxel_encoder.pfn_layers.0.linear.weight"][:16])
    plain = build_runner_config(TrainOptions(str(REPO / "configs/demo/student_half.py"), None,
                                             work_dir=str(tmp_path / "plain"), no_distill=True))
    assert "init_from_teacher" not in plain
