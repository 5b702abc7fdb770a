"""``infonce``: InfoNCE over BEV cells sampled per sample (foreground-weighted by the GT Gaussian, never
from invalid cells), plus InfoNCE over GT instances pooled over their valid cells.

* ``InfoNCELoss``: InfoNCE over cells sampled per sample (``trainer.terms.cells.sample_cells``).
* ``instance_infonce``: InfoNCE over GT instances.
* ``InfoNCETerm``: the term on the distiller's step.

The teacher side is not detached: its projection head is trained too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.terms.base import KDTerm, LayerStep, TermContext, projection_heads, register_term
from trainer.terms.cells import box_cells, gather_cells, mean_by_box, sample_cells

__all__ = ["InfoNCELoss", "instance_infonce", "InfoNCETerm"]


def _info_nce(query: Tensor, key: Tensor, temperature: float, symmetric: bool) -> Tensor:
    """Mean cross-entropy of (N, N) logits query @ key.T / T, row i's positive at column i."""
    logits = query @ key.T / temperature
    target = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, target)
    return (loss + F.cross_entropy(logits.T, target)) / 2 if symmetric else loss


class InfoNCELoss(nn.Module):
    """InfoNCE between student and teacher BEV maps over cells sampled per sample.

    forward(student_map (B, Cs, H, W), teacher_map (B, Ct, H, W) or teacher_at(b, cells (S,)) -> (S, Ct),
    fg_weight (B, H, W) | None, valid (B, H, W) bool | None, cells: per-sample (S_b,) flat indices | None,
    project: (student_head, teacher_head) | None) -> scalar.
    A callable ``teacher_at`` returns sample b's teacher vectors at flat student-grid cells; the
    distiller reads them from the cached map there instead of warping whole maps.
    Per sample, ``num_samples`` cells are drawn by ``sample_cells`` (``valid`` excludes cells
    without a cached target, e.g. GT-paste regions or warped-out areas); the positive of a student
    cell is the teacher at the same cell, its negatives the teacher at the other sampled cells of
    that sample. Cross-entropy over the (S, S) similarity / T (both directions averaged when
    ``symmetric``), averaged over samples with at least two cells; 0 (with grad) if there are none.
    ``cells`` bypasses sampling (reproducible evaluation, tests).

    With ``project``, the maps are raw features and only the sampled cells' vectors (S, C) go
    through the projection heads (per-vector ``ProjectionMLP``): projecting whole maps first costs
    H*W/S times more (a 180x180 BEVFusion map holds 126 times the default 256 cells). Without it
    the maps must already be L2-normalised embeddings of equal channel count.
    """

    def __init__(self, num_samples: int = 256, temperature: float = 0.07, fg_fraction: float = 0.5,
                 symmetric: bool = False) -> None:
        super().__init__()
        self.num_samples, self.temperature = num_samples, temperature
        self.fg_fraction, self.symmetric = fg_fraction, symmetric

    def forward(self, student_map: Tensor, teacher_map: Tensor | Callable[[int, Tensor], Tensor],
                fg_weight: Tensor | None = None, valid: Tensor | None = None, cells: Sequence[Tensor] | None = None,
                project: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        if callable(teacher_map):
            teacher_at = teacher_map
        else:
            if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[-2:] != teacher_map.shape[-2:]:
                raise ValueError(f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} maps "
                                 "differ in batch or grid; match_resolution first")
            if project is None and student_map.shape != teacher_map.shape:
                raise ValueError(f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} maps "
                                 "differ; project both (or pass project=) and match_resolution first")

            def teacher_at(b: int, idx: Tensor) -> Tensor:
                return teacher_map[b].flatten(1)[:, idx].T

        if cells is None:
            cells = self.sample(student_map, valid, fg_weight)
        keys = [teacher_at(b, index) for b, index in enumerate(cells)]
        return self.from_vectors(gather_cells(student_map, cells), keys, project) if cells else student_map.sum() * 0

    def sample(self, student_map: Tensor, valid: Tensor | None = None, fg_weight: Tensor | None = None) -> list[Tensor]:
        """Per sample, the flat cells ``forward`` draws (``sample_cells``; all cells valid without ``valid``)."""
        cells = []
        for b in range(student_map.shape[0]):
            mask = valid[b] if valid is not None else torch.ones_like(student_map[b, 0], dtype=torch.bool)
            cells.append(sample_cells(mask, self.num_samples, None if fg_weight is None else fg_weight[b],
                                      self.fg_fraction))
        return cells

    def from_vectors(self, queries: Sequence[Tensor], keys: Sequence[Tensor],
                     project: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        """The loss on gathered cell vectors: per sample, student (S_b, Cs) and teacher (S_b, Ct) rows of the
        same cells. For callers that gather the student's cells together with others (one backward fill)."""
        losses = []
        for query, key in zip(queries, keys):
            if query.shape[0] < 2:  # no negatives
                continue
            if project is not None:
                query, key = project[0](query), project[1](key)
            losses.append(_info_nce(query, key, self.temperature, self.symmetric))
        if losses:
            return torch.stack(losses).mean()
        return sum(query.sum() for query in queries) * 0 if queries else torch.zeros(())


def instance_infonce(student_vecs: Tensor, teacher_vecs: Tensor, temperature: float = 0.07,
                     symmetric: bool = False) -> Tensor:
    """InfoNCE over N GT instances: (N, D), (N, D) -> scalar; instance i's positive is teacher row i.

    Inputs are L2-normalised here, since box means of unit vectors are shorter than unit. Returns 0
    (with grad) for N = 0; with N = 1 there is no negative and the loss is 0.
    """
    if student_vecs.shape[0] == 0:
        return student_vecs.sum() * 0
    return _info_nce(F.normalize(student_vecs, dim=1), F.normalize(teacher_vecs, dim=1), temperature, symmetric)


@register_term
class InfoNCETerm(KDTerm):
    """InfoNCE over sampled BEV cells (foreground-weighted) plus, with ``instance_weight`` > 0, InfoNCE
    over GT instances: each box's student and teacher means over its *valid* covered cells (a box with
    no valid cell is left out, so an off-grid box never contributes a padded teacher mean)."""

    name = "infonce"

    def __init__(self, context: TermContext, feat_dim: int = 128, temperature: float = 0.07,
                 cells_per_sample: int = 256, fg_fraction: float = 0.5, instance_weight: float = 1.0) -> None:
        super().__init__(context)
        self.temperature, self.instance_weight = temperature, instance_weight
        self.heads = projection_heads(context, feat_dim)
        self.cells = InfoNCELoss(cells_per_sample, temperature, fg_fraction=fg_fraction)

    def plan(self, layer: LayerStep) -> None:
        if self.name in layer._requests:
            return
        hw = tuple(layer.student.shape[-2:])
        sampled = self.cells.sample(layer.student, layer.valid, layer.foreground)
        covered = [self._valid_box_cells(boxes, layer.valid[index].flatten(), hw)
                   for index, boxes in enumerate(layer.boxes)]
        layer.request(self.name, [torch.cat([cells, box_cell]) for cells, (box_cell, _, _) in zip(sampled, covered)],
                      (sampled, covered))

    def layer_loss(self, layer: LayerStep) -> Tensor:
        student, heads = layer.student, self.heads[layer.key]
        _, (sampled, covered) = layer.planned(self.name)
        gathered = layer.vectors(self.name)  # sampled cells, then box cells
        keys = [layer.teacher.read(index, layer.alignments[index].read_matrix(cells)).to(student.dtype)
                for index, cells in enumerate(sampled)]
        loss = self.cells.from_vectors([part[:len(cells)] for part, cells in zip(gathered, sampled)], keys,
                                       (heads["student"], heads["teacher"]))
        if self.instance_weight <= 0:
            return loss
        instance_terms = []
        for index, (box_cell, owner, count) in enumerate(covered):
            if count < 2:  # no negatives
                continue
            per_box = torch.bincount(owner, minlength=count).float()
            teacher_means = layer.teacher.read(index, layer.alignments[index].read_matrix(
                box_cell, owner, 1.0 / per_box[owner], count))
            student_means = mean_by_box(gathered[index][len(sampled[index]):], owner, count)
            instance_terms.append(instance_infonce(heads["student"](student_means),
                                                   heads["teacher"](teacher_means.to(student.dtype)), self.temperature))
        if instance_terms:
            loss = loss + self.instance_weight * torch.stack(instance_terms).mean()
        return loss

    @staticmethod
    def _valid_box_cells(boxes: Tensor, valid: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        """Cells each box covers that have a target: flat cells (K,), their box renumbered over the boxes
        that keep at least one cell (K,), and how many boxes that is."""
        cells, owner = box_cells(boxes, *hw)
        keep = valid[cells]
        cells, owner = cells[keep], owner[keep]
        kept, owner = torch.unique(owner, return_inverse=True)
        return cells, owner, len(kept)
