"""``mse``: masked feature regression through a 1x1 adapter, on ``cells_per_sample`` valid cells per sample
drawn uniformly (``LayerStep.regression_pairs``), and ``MaskedMSELoss``, the same on whole maps."""
from __future__ import annotations

from torch import Tensor, nn

from trainer.terms.base import CellRegressionTerm, LayerStep, TermContext, channel_adapters, register_term

__all__ = ["MaskedMSELoss", "MSETerm"]


class MaskedMSELoss(nn.Module):
    """Masked feature regression: mean squared error over valid cells.

    forward(student (B, C, H, W), teacher (B, C, H, W), mask (B, H, W) bool | None) -> scalar
    sum over valid cells and channels of (student - teacher)^2 / (valid cells * C). Without a mask
    every cell is valid; with no valid cell the loss is 0 and still backpropagates (zero gradient),
    so a batch made entirely of uncached regions does not break the step.
    """

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
        sq_err = (student - teacher).pow(2)
        if mask is None:
            return sq_err.mean()
        weight = mask.to(sq_err.dtype).unsqueeze(1)
        count = weight.sum() * student.shape[1]
        return (sq_err * weight).sum() / count.clamp_min(1)


@register_term
class MSETerm(CellRegressionTerm):
    """Masked feature regression: a 1x1 adapter maps the student's cells onto the teacher's channels;
    mean squared error over channels and compared valid cells (``cells_per_sample`` per sample, 0: all)
    against the teacher at the same places of its grid."""

    name = "mse"

    def __init__(self, context: TermContext, cells_per_sample: int = 512) -> None:
        super().__init__(context)
        self.cells_per_sample = int(cells_per_sample)
        self.adapters = channel_adapters(context, always=True)

    def layer_loss(self, layer: LayerStep) -> Tensor:
        adapted, teacher = self.adapted_pairs(layer)
        if not len(adapted):  # no valid cell in the batch: zero, still part of the graph
            return adapted.sum()
        return (adapted - teacher.to(adapted.dtype)).pow(2).mean()
