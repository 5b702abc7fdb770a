"""``reg``: response distillation on CenterHead regression outputs (offset, height, dims, heading, velocity)
at the GT centres and the teacher's confident peaks, L1 against the teacher's outputs carried into the
augmented frame (``trainer.response``: decoded, moved like mmdet3d moves a box, encoded on the student's
grid)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from trainer.response import REGRESSION_KINDS, augmented_targets
from trainer.terms.base import KDTerm, LayerStep, TermContext, check_parameter, register_term

__all__ = ["RegressionTerm"]


def _one_hot_read(cells: Tensor, hw: Sequence[int]) -> Tensor:
    """Sparse (N, H*W) matrix reading flat cell ``cells[n]`` into row n (nearest-cell reads)."""
    rows = torch.arange(len(cells), device=cells.device)
    return torch.sparse_coo_tensor(torch.stack([rows, cells]), torch.ones(len(cells), device=cells.device),
                                   (len(cells), hw[0] * hw[1])).coalesce()


@register_term
class RegressionTerm(KDTerm):
    """Response distillation on CenterHead regression outputs at the GT centres and the teacher's peaks
    (UniDistill's and SparseKD's regression KD): per GT box, and per teacher box scoring at least
    ``peak_score`` (``featcache build --boxes``: the teacher's decoded predictions, whose centres lie
    in the heatmap peaks its decoder took), the student's output at the cell holding the centre (where
    CenterHead's own regression loss looks) against the teacher's output at the cell holding the same
    centre in the cache frame (``BevAlignment.teacher_cells_of``), carried into the augmented frame
    and the student's encoding (``trainer.response.augmented_targets``); L1 (``loss="l1"``) or smooth
    L1, mean over centre cells (each counted once) and channels. The teacher's own estimate replaces
    the GT value: where it is off, the student learns what the teacher can see in the points, which
    is the point of distilling it; at its peaks without a GT box (objects the annotation missed, or
    the teacher's confident false positives) the student learns the teacher's boxes too.
    ``peak_score`` > 1 reads GT centres only; without teacher boxes in the run the same holds.
    """

    name = "reg"
    kinds = REGRESSION_KINDS
    without_teacher_boxes = "reads GT centres only (the teacher's peaks come from its boxes)"

    @classmethod
    def reads_teacher_boxes(cls, params: Mapping[str, Any]) -> bool:
        """The teacher's peaks come from its boxes, read unless ``peak_score`` > 1 (GT centres only)."""
        return float({**cls.defaults(), **params}["peak_score"]) <= 1

    def __init__(self, context: TermContext, loss: str = "l1", beta: float = 0.1, peak_score: float = 0.5) -> None:
        super().__init__(context)
        check_parameter(loss in ("l1", "smooth_l1"), "reg", "loss must be 'l1' or 'smooth_l1'", repr(loss))
        check_parameter(peak_score >= 0, "reg", "peak_score must be >= 0 (> 1: GT centres only)", peak_score)
        self.loss, self.beta, self.peak_score = loss, float(beta), float(peak_score)

    def centres(self, layer: LayerStep, index: int) -> Tensor:
        """(N, 2) the sample's centres in student cells: its GT boxes', then its teacher boxes' above
        ``peak_score``."""
        boxes = layer.boxes[index]
        if layer.teacher_boxes is not None and self.peak_score <= 1:
            peaks = layer.teacher_boxes[index][layer.teacher_scores[index] >= self.peak_score]
            boxes = torch.cat([boxes, peaks.to(boxes)])
        return (boxes[:, :2] + boxes[:, 2:]) / 2  # a rotated box's AABB shares its centre

    def layer_loss(self, layer: LayerStep) -> Tensor:
        student = layer.student
        height, width = student.shape[-2:]
        predictions, targets = [], []
        for index, alignment in enumerate(layer.alignments):
            centres = self.centres(layer, index)
            if not len(centres):
                continue
            cells = centres.floor().long()
            teacher_cells, on_grid = alignment.teacher_cells_of(centres)
            keep = on_grid & (cells[:, 0] >= 0) & (cells[:, 0] < width) & (cells[:, 1] >= 0) & (cells[:, 1] < height)
            cells, teacher_cells = cells[keep], teacher_cells[keep]
            keep = layer.valid[index][cells[:, 1], cells[:, 0]]  # GT-pasted or off the teacher grid: no target
            cells, teacher_cells = cells[keep], teacher_cells[keep]
            # a teacher peak on a GT centre's cell (or two boxes in one cell) is one target, counted once
            flat, inverse = torch.unique(cells[:, 1] * width + cells[:, 0], return_inverse=True)
            positions = torch.arange(len(cells), device=cells.device)
            first = torch.full((len(flat),), len(cells), dtype=torch.long, device=cells.device).scatter_reduce(
                0, inverse, positions, reduce="amin")
            cells, teacher_cells = cells[first], teacher_cells[first]
            if not len(cells):
                continue
            teacher = layer.teacher.read(index, _one_hot_read(alignment.teacher_flat_index(teacher_cells),
                                                              alignment.teacher_hw))
            targets.append(augmented_targets(layer.kind, teacher, teacher_cells, cells, alignment.teacher_range,
                                             alignment.teacher_grid, alignment.student_range, (height, width),
                                             alignment.meta, log_dims=layer.log_dims))
            predictions.append(student[index][:, cells[:, 1], cells[:, 0]].T)
        if not predictions:  # no centre with a target in the batch: zero, still part of the graph
            return student.sum() * 0
        difference = torch.cat(predictions).float() - torch.cat(targets).float()
        if self.loss == "l1":
            return difference.abs().mean()
        return torch.nn.functional.smooth_l1_loss(difference, torch.zeros_like(difference), beta=self.beta)
