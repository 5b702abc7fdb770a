"""Projection heads that map student and teacher features into one comparable embedding space.

A distilled student layer and its teacher layer usually differ in channel count and often in BEV
resolution. Each side gets its own small MLP into a shared, L2-normalised ``feat_dim`` space (so
dot products are cosine similarities, as the contrastive losses assume), and the student map is
resampled onto the teacher's grid. Torch only: the trainer sizes these heads from shapes it probed,
so nothing here depends on mmengine or mmdet3d.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProjectionMLP", "match_resolution", "head_key", "heads_for"]


def _num_groups(channels: int) -> int:
    # At most 32 groups (the usual GroupNorm setting) but at least 4 channels per group: a pooled
    # (B, C) vector is a single cell, so a 1-channel group would have zero variance and be erased.
    return max((g for g in range(1, 33) if channels % g == 0 and channels // g >= 4), default=1)


class ProjectionMLP(nn.Module):
    """Two-layer per-cell MLP into an L2-normalised ``feat_dim`` embedding.

    * (B, C, H, W) BEV map -> (B, feat_dim, H, W), unit L2 norm over dim 1 (per cell);
    * (B, C) pooled vector  -> (B, feat_dim), unit L2 norm over dim 1.

    Both inputs go through the same weights: a 1x1 convolution applied to a 1x1 map is exactly a
    Linear layer, so one head can embed whole maps (InfoNCE, MSE) and box- or globally-pooled
    vectors (instance InfoNCE, CRD) without keeping two parameter sets in sync.

    Layout: conv1x1 (no bias) -> GroupNorm -> ReLU -> conv1x1. GroupNorm, not BatchNorm, because lidar
    detectors train with 1-4 samples per GPU, where batch statistics are noisy (and a single pooled
    vector has none). ``hidden`` defaults to ``max(feat_dim, in_channels // 2)``: it halves wide
    backbone outputs but never bottlenecks below the embedding it has to produce.
    """

    def __init__(self, in_channels: int, feat_dim: int = 128, hidden: int | None = None) -> None:
        super().__init__()
        if hidden is None:
            hidden = max(feat_dim, in_channels // 2)
        self.in_channels, self.feat_dim, self.hidden = in_channels, feat_dim, hidden
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.GroupNorm(_num_groups(hidden), hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, feat_dim, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, feat_dim, H, W) or (B, C) -> (B, feat_dim), unit norm over dim 1."""
        if x.ndim == 4:
            return F.normalize(self.net(x), dim=1)
        if x.ndim == 2:  # the same weights as linear maps: a 1x1 convolution's kernels on (N, C, 1, 1) cost more
            squeeze, norm, relu, expand = self.net
            hidden = relu(norm(F.linear(x, squeeze.weight.flatten(1))))
            return F.normalize(F.linear(hidden, expand.weight.flatten(1), expand.bias), dim=1)
        raise ValueError(f"ProjectionMLP expects (B, C) or (B, C, H, W) input, got shape {tuple(x.shape)}")


def match_resolution(student: Tensor, teacher: Tensor, mode: str = "bilinear") -> tuple[Tensor, Tensor]:
    """Resample the student map (B, C, Hs, Ws) onto the teacher's (Ht, Wt) grid.

    Returns ``(student (B, C, Ht, Wt), teacher)``; ``teacher`` is returned as-is (the same object). The
    teacher map is the cached target: resampling it instead would change the stored targets and make
    what the student is trained on depend on the student's architecture.

    When the student is at least as large in both dimensions (downsampling) it is area-averaged
    (adaptive average pooling), so every student cell contributes and receives gradient instead of
    interpolation skipping cells. Otherwise (upsampling, or up in one dimension and down in the other)
    it is interpolated with ``mode`` ("bilinear" by default, align_corners=False; "nearest" also works).
    Equal sizes are returned unchanged.
    """
    size = (teacher.shape[-2], teacher.shape[-1])
    if (student.shape[-2], student.shape[-1]) == size:
        return student, teacher
    if student.shape[-2] >= size[0] and student.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(student, size), teacher
    return F.interpolate(student, size=size, mode=mode), teacher


def head_key(layer: str) -> str:
    """ModuleDict key of a layer name: module child names may not contain '.', so '.' becomes '__'."""
    return layer.replace(".", "__")


def heads_for(student_shapes: dict[str, tuple[int, ...]], teacher_shapes: dict[str, tuple[int, ...]],
              pairs: dict[str, str], feat_dim: int = 128, hidden: int | None = None) -> nn.ModuleDict:
    """One student and one teacher ProjectionMLP per distilled pair, sized from probed shapes.

    ``student_shapes`` / ``teacher_shapes`` map a layer name to its per-sample output shape (C, H, W)
    as probed from one forward pass; only C is used, resolution differences being left to
    ``match_resolution``. ``pairs`` maps student layer -> teacher layer.

    Returns ``{head_key(student_layer): ModuleDict(student=ProjectionMLP, teacher=ProjectionMLP)}``,
    e.g. ``heads[head_key("pts_neck.blocks.0")]["teacher"]``. Raises ValueError when a paired layer
    has no probed shape, or when two student layers sanitise to the same key ("a.b" and "a__b").
    """
    heads = nn.ModuleDict()
    owners: dict[str, str] = {}
    for s_layer, t_layer in pairs.items():
        for side, layer, shapes in (("student", s_layer, student_shapes), ("teacher", t_layer, teacher_shapes)):
            if layer not in shapes:
                raise ValueError(f"{side} layer {layer!r} has no probed shape (probed: {sorted(shapes)})")
        key = head_key(s_layer)
        if key in owners:
            raise ValueError(f"student layers {owners[key]!r} and {s_layer!r} both map to head key {key!r}")
        owners[key] = s_layer
        heads[key] = nn.ModuleDict({
            "student": ProjectionMLP(student_shapes[s_layer][0], feat_dim, hidden),
            "teacher": ProjectionMLP(teacher_shapes[t_layer][0], feat_dim, hidden),
        })
    return heads
