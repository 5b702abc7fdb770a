"""``label``: label distillation (SparseKD): confident teacher boxes not already annotated join the GT of
the student's detection loss (no loss of its own; the distiller applies it before the student's loss,
``LabelTerm.extra_targets``)."""
from __future__ import annotations

import torch
from torch import Tensor

from trainer.terms.base import DistillStep, KDTerm, TermContext, check_parameter, register_term

__all__ = ["LabelTerm"]


@register_term
class LabelTerm(KDTerm):
    """Label distillation (SparseKD's label KD): the teacher's boxes scoring at least ``score_thresh``
    join the GT of the student's own detection loss, before its targets are assigned, unless a GT box
    of any class has its BEV centre within ``dedup_distance`` metres (the same object, annotated).
    The term has no loss of its own: what it adds is weighted by the detection loss, so its weight
    must be 1 (0 turns it off). Teacher boxes reach the step in the augmented frame
    (``trainer.transforms.teacher_instances`` from the cache, or the online teacher's predictions).
    """

    name = "label"
    kinds = ()
    changes_gt = True

    def __init__(self, context: TermContext, score_thresh: float = 0.5, dedup_distance: float = 1.0) -> None:
        super().__init__(context)
        check_parameter(0 <= score_thresh <= 1, "label", "score_thresh must be in [0, 1]", score_thresh)
        check_parameter(dedup_distance >= 0, "label", "dedup_distance must be >= 0 metres", dedup_distance)
        self.score_thresh, self.dedup_distance = float(score_thresh), float(dedup_distance)

    def forward(self, step: DistillStep) -> dict[str, Tensor]:
        return {}

    def extra_targets(self, gt_centres: Tensor, teacher_centres: Tensor, teacher_scores: Tensor) -> Tensor:
        """(K,) bool over one sample's teacher boxes: those that join its GT. ``gt_centres`` (N, 2) and
        ``teacher_centres`` (K, 2) are BEV centres in metres, augmented frame."""
        keep = teacher_scores >= self.score_thresh
        if len(gt_centres) and len(teacher_centres):
            nearest = torch.cdist(teacher_centres.float(), gt_centres.to(teacher_centres).float(),
                                  compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values  # exact, never NaN
            keep &= nearest > self.dedup_distance
        return keep
