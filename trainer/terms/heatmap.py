"""``heatmap``: response distillation on CenterHead class heatmaps (SparseKD, Yang et al. NeurIPS 2022):
squared (or L1, UniDistill) difference of student and teacher sigmoid scores, classes matched by name,
each cell weighted by the teacher's highest class score."""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.terms.base import KDTerm, LayerStep, TermContext, check_parameter, register_term

__all__ = ["clamped_sigmoid", "HeatmapTerm"]


def clamped_sigmoid(logits: Tensor, eps: float = 1e-4) -> Tensor:
    """Sigmoid clamped to [eps, 1 - eps], as mmdet3d's CenterHead scores its heatmap (``clip_sigmoid``)."""
    return torch.sigmoid(logits.float()).clamp(eps, 1 - eps)


@register_term
class HeatmapTerm(KDTerm):
    """Response distillation on class heatmaps (SparseKD's heatmap KD; UniDistill's with ``loss="l1"``).

    Per sample, the teacher's heatmap logits (cache frame) are warped onto the student's augmented
    heatmap grid like any cached map (``BevAlignment.warp``: flips, rotation and scaling move the
    cells, a resolution difference is resampled bilinearly), and the classes the student shares with
    the teacher (``LayerStep.channel_map``) are compared as sigmoid scores:

        loss = sum_cells w * sum_classes d(s, t) / sum_cells w,  d = (s - t)^2 or |s - t|,

    over cells with a teacher target (``valid``), with w = the teacher's highest class score at the
    cell when ``confidence_weighted`` (SparseKD's weighting: cells where the teacher sees an object,
    or a false positive the student should learn to avoid too, count; the 99% of empty background
    cells barely do), times ``1 + gt_weight * foreground`` (the GT Gaussian) when ``gt_weight`` > 0.
    Heatmaps are small (classes x the head's grid), so the whole map is read.
    """

    name = "heatmap"
    kinds = ("heatmap",)

    def __init__(self, context: TermContext, loss: str = "mse", confidence_weighted: bool = True,
                 gt_weight: float = 0.0) -> None:
        super().__init__(context)
        check_parameter(loss in ("mse", "l1"), "heatmap", "loss must be 'mse' (SparseKD) or 'l1' (UniDistill)", repr(loss))
        check_parameter(gt_weight >= 0, "heatmap", "gt_weight must be >= 0", gt_weight)
        self.loss, self.confidence_weighted, self.gt_weight = loss, bool(confidence_weighted), float(gt_weight)

    def layer_loss(self, layer: LayerStep) -> Tensor:
        student = layer.student
        if layer.channel_map is None:
            raise ValueError(f"heatmap pair {layer.key} has no channel_map (student class -> teacher channel)")
        shared = (layer.channel_map >= 0).nonzero().flatten()
        if not len(shared):  # no class in common: zero, still part of the graph
            return student.sum() * 0
        total, norm = student.sum() * 0, student.new_zeros(())
        for index, alignment in enumerate(layer.alignments):
            teacher = clamped_sigmoid(alignment.warp(layer.teacher.decoded(index)))[layer.channel_map[shared]]
            scores = clamped_sigmoid(student[index, shared])
            weights = layer.valid[index].float()
            if self.confidence_weighted:
                weights = weights * teacher.max(dim=0).values
            if self.gt_weight > 0:
                weights = weights * (1 + self.gt_weight * layer.foreground[index])
            difference = scores - teacher
            per_cell = (difference.pow(2) if self.loss == "mse" else difference.abs()).sum(dim=0)
            total = total + (weights * per_cell).sum()
            norm = norm + weights.sum()
        return total / norm.clamp_min(1e-6)
