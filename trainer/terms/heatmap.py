"""``heatmap``: response distillation on CenterHead class heatmaps, classes matched by name.

Two families of losses, both on the teacher's sigmoid scores warped onto the student's grid:

* ``mse`` / ``l1`` (SparseKD, Yang et al. NeurIPS 2022; UniDistill): the difference of student and teacher
  *scores*, each cell weighted by the teacher's highest class score. Its gradient, 2(s - t) s (1 - s) per
  logit, vanishes where the student misses an object (s = 0.01, t = 0.9: 0.018): it polishes what the
  student sees and cannot teach what it misses.
* ``focal`` / ``bce``: a soft-target loss on the student's *logits*, whose gradient (s - t) does not
  vanish where the student is wrong. ``focal`` is the Quality Focal Loss of Generalized Focal Loss (Li et
  al. NeurIPS 2020): BCE(s, t) |t - s|^beta, the teacher's score as the soft label (mmdet's
  ``quality_focal_loss_tensor_target``; the modulating factor keeps the 99% of easy background cells
  from drowning the objects); ``bce`` is the plain soft BCE. Both are normalised as CenterHead
  normalises its own focal loss beside them: per object, here per teacher peak (a cell that is the
  3x3 maximum of a class's teacher score and at least ``peak_threshold``), not per unit of confidence,
  so ``heatmap=1`` weighs about as the detection heatmap loss does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.terms.base import KDTerm, LayerStep, TermContext, check_parameter, register_term

__all__ = ["clamped_sigmoid", "teacher_peaks", "soft_focal_loss", "HeatmapTerm"]

SCORE_LOSSES = ("mse", "l1")
LOGIT_LOSSES = ("focal", "bce")


def clamped_sigmoid(logits: Tensor, eps: float = 1e-4) -> Tensor:
    """Sigmoid clamped to [eps, 1 - eps], as mmdet3d's CenterHead scores its heatmap (``clip_sigmoid``)."""
    return torch.sigmoid(logits.float()).clamp(eps, 1 - eps)


def teacher_peaks(scores: Tensor, threshold: float) -> Tensor:
    """(C, H, W) bool: cells holding the 3x3 maximum of their class's score, at least ``threshold`` (where
    CenterPoint's decoder would find an object: one per teacher detection, before NMS)."""
    pooled = F.max_pool2d(scores[None], kernel_size=3, stride=1, padding=1)[0]
    return (scores >= pooled) & (scores >= threshold)


def soft_focal_loss(logits: Tensor, targets: Tensor, beta: float) -> Tensor:
    """Per element, BCE(sigmoid(logits), targets) * |targets - sigmoid(logits)|^beta (Quality Focal Loss;
    ``beta`` = 0: soft BCE), in float32."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if beta == 0:
        return bce
    return bce * (targets - torch.sigmoid(logits)).abs().pow(beta)


@register_term
class HeatmapTerm(KDTerm):
    """Response distillation on class heatmaps (module docstring: which loss when).

    Per sample, the teacher's heatmap logits (cache frame) are warped onto the student's augmented
    heatmap grid like any cached map (``BevAlignment.warp``: flips, rotation and scaling move the
    cells, a resolution difference is resampled bilinearly), and the classes the student shares with
    the teacher (``LayerStep.channel_map``) are compared over the cells with a teacher target (``valid``):

    * ``loss="mse"`` / ``"l1"``: sum_cells w * sum_classes d(s, t) / sum_cells w, d = (s - t)^2 or |s - t|,
      w = the teacher's highest class score at the cell when ``confidence_weighted`` (SparseKD's
      weighting: cells where the teacher sees an object, or a false positive the student should
      learn to avoid too, count; empty background barely does);
    * ``loss="focal"`` / ``"bce"``: sum_cells w * sum_classes soft_focal_loss(logit, t) / max(1, peaks),
      ``beta`` the focal exponent (``bce``: 0), peaks counted by :func:`teacher_peaks` over the batch;

    w times ``1 + gt_weight * foreground`` (the GT Gaussian) when ``gt_weight`` > 0.
    Heatmaps are small (classes x the head's grid), so the whole map is read.
    """

    name = "heatmap"
    kinds = ("heatmap",)

    def __init__(self, context: TermContext, loss: str = "mse", confidence_weighted: bool | None = None,
                 gt_weight: float = 0.0, beta: float = 2.0, peak_threshold: float = 0.1) -> None:
        super().__init__(context)
        check_parameter(loss in SCORE_LOSSES + LOGIT_LOSSES, "heatmap",
                        "loss must be 'mse' (SparseKD), 'l1' (UniDistill), 'focal' (soft-target quality focal loss) "
                        "or 'bce' (soft-target BCE)", repr(loss))
        check_parameter(gt_weight >= 0, "heatmap", "gt_weight must be >= 0", gt_weight)
        check_parameter(beta >= 0, "heatmap", "beta must be >= 0", beta)
        check_parameter(0 < peak_threshold < 1, "heatmap", "peak_threshold must be in (0, 1)", peak_threshold)
        check_parameter(not (confidence_weighted and loss in LOGIT_LOSSES), "heatmap",
                        "confidence_weighted applies to loss='mse' or 'l1' (the focal and BCE losses weigh cells "
                        "by their own error)", confidence_weighted)
        self.loss, self.gt_weight = loss, float(gt_weight)
        self.confidence_weighted = loss in SCORE_LOSSES if confidence_weighted is None else bool(confidence_weighted)
        self.beta = 0.0 if loss == "bce" else float(beta)
        self.peak_threshold = float(peak_threshold)

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
            weights = layer.valid[index].float()
            if self.confidence_weighted:
                weights = weights * teacher.max(dim=0).values
            if self.gt_weight > 0:
                weights = weights * (1 + self.gt_weight * layer.foreground[index])
            if self.loss in LOGIT_LOSSES:
                per_cell = soft_focal_loss(student[index, shared], teacher, self.beta).sum(dim=0)
                norm = norm + (teacher_peaks(teacher, self.peak_threshold) & layer.valid[index]).sum()
            else:
                difference = clamped_sigmoid(student[index, shared]) - teacher
                per_cell = (difference.pow(2) if self.loss == "mse" else difference.abs()).sum(dim=0)
                norm = norm + weights.sum()
            total = total + (weights * per_cell).sum()
        return total / norm.clamp_min(1.0 if self.loss in LOGIT_LOSSES else 1e-6)
