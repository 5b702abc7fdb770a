"""``pkd``: PKD (Cao et al., NeurIPS 2022; mmrazor's ``PKDLoss``): both maps standardised per channel over the
batch's compared valid cells, then half their mean squared difference, which is 1 - Pearson's r per
channel. A 1x1 adapter maps the student's channels onto the teacher's when they differ."""
from __future__ import annotations

from torch import Tensor

from trainer.terms.base import CellRegressionTerm, LayerStep, TermContext, channel_adapters, register_term

__all__ = ["pkd_standardise", "PKDTerm"]


def pkd_standardise(vectors: Tensor, eps: float = 1e-6) -> Tensor:
    """(N, C) cell vectors standardised per channel over the N cells: (x - mean) / (std + eps) with the
    unbiased std, mmrazor's ``PKDLoss.norm`` on the compared cells instead of every cell of the map."""
    mean = vectors.mean(dim=0, keepdim=True)
    var = (vectors - mean).pow(2).sum(dim=0, keepdim=True) / max(len(vectors) - 1, 1)
    return (vectors - mean) / (var.sqrt() + eps)


@register_term
class PKDTerm(CellRegressionTerm):
    """PKD: student and teacher cells standardised per channel over the batch's compared valid cells
    (``pkd_standardise``; ``cells_per_sample`` per sample, 0: all), then half their mean squared
    difference, i.e. mean over channels of 1 - Pearson's r between student and teacher activations.
    Invariant to the teacher's per-channel scale and offset, which is why it needs no weight tuning
    against the feature magnitudes the other regression terms see."""

    name = "pkd"

    def __init__(self, context: TermContext, eps: float = 1e-6, cells_per_sample: int = 512) -> None:
        super().__init__(context)
        self.eps = eps
        self.cells_per_sample = int(cells_per_sample)
        self.adapters = channel_adapters(context, always=False)

    def layer_loss(self, layer: LayerStep) -> Tensor:
        adapted, teacher = self.adapted_pairs(layer)
        if len(adapted) < 2:  # no spread to standardise by: zero, still part of the graph
            return adapted.sum() * 0
        student_n = pkd_standardise(adapted, self.eps)
        teacher_n = pkd_standardise(teacher.to(adapted.dtype), self.eps)
        return (student_n - teacher_n).pow(2).mean() / 2
