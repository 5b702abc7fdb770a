"""Start a student from its teacher's weights: SparseKD's weight inheritance, one load, no teacher forward.

A student of the teacher's family (same layer names, narrower and/or shallower: the demo's half and
slim students, ``configs/students/``) takes, for every tensor the teacher also has, the teacher's
values sliced to the student's shape: the first ``s`` of the teacher's ``t`` channels on every axis
where they differ. Taking the *first* channels everywhere keeps producer and consumer consistent:
channel ``j`` of one layer's output is channel ``j`` of the next layer's input. A shallower student
keeps the teacher's first layers of each stage (its tensor names are a subset of the teacher's).

One place breaks that rule: a layer that reads a concatenation. SECONDFPN concatenates its upsampled
levels (``out_channels`` per level) and the head's first layer reads them all; there the slice is
taken per level (the first ``s_i`` of each level's ``t_i`` channels), so a student level still reads
the teacher level it mirrors. Tensors the teacher lacks, or that are larger in the student, keep the
student's own initialisation and are counted in the report.

BatchNorm statistics are sliced too; a narrower layer sums fewer inputs, so its first batches' activations
differ from the teacher's statistics, which batch statistics absorb in training mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger("trainer.inherit")

__all__ = ["InheritReport", "inherit_weights", "concat_groups", "check_same_grid", "inherit_from_teacher"]


@dataclass
class InheritReport:
    """What :func:`inherit_weights` did, tensor by tensor name."""

    copied: list[str] = field(default_factory=list)  # same shape: the teacher's values
    sliced: list[str] = field(default_factory=list)  # narrower student: the teacher's first channels
    kept: list[str] = field(default_factory=list)  # no usable teacher tensor: the student's own init

    def summary(self) -> str:
        total = len(self.copied) + len(self.sliced) + len(self.kept)
        line = (f"initialised from the teacher: {len(self.copied)} of {total} tensors copied, {len(self.sliced)} "
                f"sliced to the student's widths, {len(self.kept)} kept")
        return line + (f" (e.g. {', '.join(self.kept[:3])})" if self.kept else "")


def _neck_levels(model: nn.Module) -> list[int] | None:
    neck = getattr(model, "pts_neck", None) or getattr(model, "neck", None)
    levels = getattr(neck, "out_channels", None)
    return [int(c) for c in levels] if isinstance(levels, (list, tuple)) and len(levels) > 1 else None


def concat_groups(student: nn.Module, teacher: nn.Module) -> dict[str, tuple[list[int], list[int]]]:
    """Head tensors whose input axis (1) reads the neck's concatenated levels: name -> (student level
    widths, teacher level widths). Recognised by size: axis 1 equals the sum of the neck's level widths
    in both models."""
    levels_s, levels_t = _neck_levels(student), _neck_levels(teacher)
    if levels_s is None or levels_t is None or len(levels_s) != len(levels_t):
        return {}
    teacher_state = teacher.state_dict()
    groups = {}
    for name, value in student.state_dict().items():
        if not name.split(".")[0] in ("pts_bbox_head", "bbox_head") or value.dim() < 2 or name not in teacher_state:
            continue
        if (value.shape[1] == sum(levels_s) and teacher_state[name].shape[1] == sum(levels_t) != sum(levels_s)
                and all(s <= t for s, t in zip(levels_s, levels_t))):
            groups[name] = (levels_s, levels_t)
    return groups


def _slice(teacher: Tensor, shape: Sequence[int], groups: tuple[list[int], list[int]] | None) -> Tensor:
    """The teacher tensor's first entries along every axis, axis 1 per level when ``groups`` is given."""
    index = tuple(slice(0, size) for size in shape)
    if groups is None:
        return teacher[index]
    levels_s, levels_t = groups
    starts = [sum(levels_t[:level]) for level in range(len(levels_t))]
    channels = torch.cat([torch.arange(start, start + width) for start, width in zip(starts, levels_s)])
    return teacher[(index[0],)].index_select(1, channels)[(slice(None), slice(None)) + index[2:]]


@torch.no_grad()
def inherit_weights(student: nn.Module, teacher_state: dict[str, Tensor],
                    groups: dict[str, tuple[list[int], list[int]]] | None = None) -> InheritReport:
    """Copy (or slice) ``teacher_state`` into ``student`` in place, per :mod:`this module's <trainer.inherit>`
    rule; ``groups`` (:func:`concat_groups`) names the tensors that read concatenated neck levels."""
    groups = groups or {}
    report = InheritReport()
    for name, value in student.state_dict().items():
        source = teacher_state.get(name)
        if source is None or not hasattr(source, "shape") or source.dim() != value.dim():
            report.kept.append(name)
        elif tuple(source.shape) == tuple(value.shape):
            value.copy_(source)
            report.copied.append(name)
        elif value.dim() == 0 or any(s > t for s, t in zip(value.shape, source.shape)):
            report.kept.append(name)
        else:
            value.copy_(_slice(source, value.shape, groups.get(name)))
            report.sliced.append(name)
    logger.info(report.summary())
    return report


def voxel_grid(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(voxel size, point cloud range) the model's voxelisation discretises its input with; None for a
    model that voxelises nothing (no ``data_preprocessor.voxel_layer``)."""
    layer = getattr(getattr(model, "data_preprocessor", None), "voxel_layer", None)
    if layer is None or not hasattr(layer, "voxel_size"):
        return None
    return (tuple(float(v) for v in layer.voxel_size), tuple(float(v) for v in layer.point_cloud_range))


def check_same_grid(student: nn.Module, teacher: nn.Module, config: str) -> None:
    """Refuse a student whose voxel grid is not the teacher's: every copied layer would read features of
    another discretisation (the pillar encoder's offsets in other units, BEV kernels spanning other
    distances, head offsets in other cells); a weight copy is no start for it. Such a student learns
    from the cache's targets, which are resampled onto its grid."""
    student_grid, teacher_grid = voxel_grid(student), voxel_grid(teacher)
    if student_grid is not None and teacher_grid is not None and student_grid != teacher_grid:
        from featcache.errors import ConfigError

        raise ConfigError(
            f"--init-from-teacher {config}: the teacher voxelises at {list(teacher_grid[0])} m over "
            f"{list(teacher_grid[1])}, the student at {list(student_grid[0])} m over {list(student_grid[1])}; "
            "weights learned on another grid are no start for this student: train it without "
            "--init-from-teacher (the cache's targets are resampled onto its grid)")


def inherit_from_teacher(student: nn.Module, config: str, checkpoint: str) -> InheritReport:
    """Build the teacher of ``config`` with ``checkpoint`` (its weights only: never run) and
    :func:`inherit_weights` into ``student``. The global random generator is left as it was, so the
    data order of a seed does not depend on whether the student inherits."""
    from featcache.teacher import models

    with torch.random.fork_rng(devices=[]):
        teacher = models.build_model(models.load_config(config), checkpoint)
    check_same_grid(student, teacher, config)
    report = inherit_weights(student, teacher.state_dict(), concat_groups(student, teacher))
    if not report.copied and not report.sliced:
        from featcache.errors import ConfigError

        raise ConfigError(f"--init-from-teacher {config} {checkpoint}: the teacher shares no tensor name with the "
                          "student; inheritance needs a student of the teacher's family (same layer names)")
    return report
