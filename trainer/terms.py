"""Distillation loss terms: small torch-only modules, each owning its projection heads or adapters.

The distiller fills one :class:`DistillStep` per training step (student maps, teacher maps as the
cache handed them out, the per-sample alignment of the two grids, ``valid`` and foreground masks,
GT boxes, cache rows) and every configured term reads what it needs from it. Terms are combined by
weight (``--kd infonce=1,pkd=5``); each returns one loss per distilled layer pair, logged as
``loss_kd_<term>_<layer>``. Nothing here imports mmengine or mmdet3d, so every term is unit-tested
on plain tensors (tests/test_losses_heads.py, tests/test_terms.py).

Terms (:data:`TERMS`):

* ``crd``: CRD (Tian et al., ICLR 2020) on each sample's valid-cell mean, momentum memory banks over
  cache rows (``losses.CRDLoss``).
* ``infonce``: InfoNCE over BEV cells sampled per sample (foreground-weighted by the GT Gaussian,
  never from invalid cells), plus InfoNCE over GT instances pooled over their valid cells.
* ``mse``: masked feature regression through a 1x1 adapter.
* ``pkd``: PKD (Cao et al., NeurIPS 2022; mmrazor's ``PKDLoss``): both maps standardised per channel
  over the batch's valid cells, then half their mean squared difference, which is 1 - Pearson's r
  per channel. A 1x1 adapter maps the student's channels onto the teacher's when they differ.
* ``heatmap``: response distillation on CenterHead class heatmaps (SparseKD, Yang et al. NeurIPS
  2022): squared (or L1, UniDistill) difference of student and teacher sigmoid scores, classes
  matched by name, each cell weighted by the teacher's highest class score.
* ``reg``: response distillation on CenterHead regression outputs (offset, height, dims, heading,
  velocity) at the GT centres and the teacher's confident peaks, L1 against the teacher's outputs
  carried into the augmented frame (``trainer.response``: decoded, moved like mmdet3d moves a box,
  encoded on the student's grid).
* ``label``: label distillation (SparseKD): confident teacher boxes not already annotated join the
  GT of the student's detection loss (no loss of its own; the distiller applies it before the
  student's loss, ``LabelTerm.extra_targets``).

Feature terms read the ``feature`` pairs (hooked layers); response terms (``heatmap``, ``reg``) read
the pairs of their kind (cached head outputs); :attr:`KDTerm.kinds` says which (``label`` reads none).

The two regression terms compare ``cells_per_sample`` valid cells per sample (default 512), drawn
uniformly (0: every valid cell): an unbiased estimate of the loss over all valid cells that reads only those cells' teacher
values (``TeacherMaps.read``), never decoding and warping whole maps. At BEVFusion-lidar sizes (512
channels on 180x180 per layer) the dense path cost 2-5x the student's own step.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from trainer.bev_warp import BevAlignment
from trainer.heads import ProjectionMLP
from trainer.losses import (CRDLoss, InfoNCELoss, box_cells, gather_cells, instance_infonce, mean_by_box,
                            sample_cells)
from trainer.response import REGRESSION_KINDS, augmented_targets
from trainer.targets import TeacherMaps

__all__ = ["LayerStep", "DistillStep", "TermContext", "KDTerm", "TERMS", "register_term", "build_term",
           "parse_kd_spec", "pkd_standardise", "clamped_sigmoid"]


@dataclass
class LayerStep:
    """One distilled (student layer, teacher layer) pair in one training step.

    Attributes:
        key: the student layer's head key (``pts_neck.0`` -> ``pts_neck__0``), used in loss names.
        student: (B, Cs, H, W) student map, with gradient.
        teacher: the teacher's maps for the batch, stored values decoded where read.
        alignments: per sample, where each student cell reads the teacher grid (augmentation undone).
        valid: (B, H, W) bool, cells with a teacher target (on the teacher grid, not GT-pasted).
        foreground: (B, H, W) float in [0, 1], the GT boxes' CenterHead-style Gaussian on the student grid.
        boxes: per sample (N, 4) GT boxes as axis-aligned [x1, y1, x2, y2] in student cell units.
        rows: (B,) long, the samples' cache rows (CRD's memory index).
        kind: ``"feature"`` (a hooked layer) or a head output's kind (``"heatmap"``, ``"reg"``, ``"dim"``...).
        channel_map: for heatmaps, (Cs,) long: per student channel the teacher channel holding the
            same class (matched by name), -1 where the teacher has no such class.
        log_dims: for ``dim`` outputs, whether they hold log extents (CenterHead's ``norm_bbox``).
        teacher_boxes / teacher_scores: per sample the teacher's boxes (K, 4, as ``boxes``, augmented
            frame) and their scores (K,), for a regression pair only its task's classes; None when the
            run has no teacher boxes (a cache built without ``--boxes``).
    """

    key: str
    student: Tensor
    teacher: TeacherMaps
    alignments: list[BevAlignment]
    valid: Tensor
    foreground: Tensor
    boxes: list[Tensor]
    rows: Tensor
    kind: str = "feature"
    channel_map: Tensor | None = None
    log_dims: bool = True
    teacher_boxes: list[Tensor] | None = None
    teacher_scores: list[Tensor] | None = None
    _requests: dict[str, tuple[list[Tensor], Any]] = field(default_factory=dict, repr=False)
    _vectors: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)
    _teacher_reads: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def request(self, key: str, cells: Sequence[Tensor], note: Any = None) -> None:
        """Announce that a term reads the student map at ``cells`` (per sample, flat indices into H*W)
        under ``key``, with ``note`` (whatever the term needs back with them, ``planned``). A key asked
        for twice keeps its first cells: terms that name the same key read the same cells.

        Every request made before the first ``vectors`` call is served by one indexing operation: each
        differentiable gather's backward fills a zero gradient of the whole batch map, which at BEV
        sizes (a 512x512 pillar grid) costs more than the terms, once per gather."""
        self._requests.setdefault(key, (list(cells), note))

    def planned(self, key: str) -> tuple[list[Tensor], Any]:
        """(cells, note) of the request ``key``."""
        if key not in self._requests:
            raise KeyError(f"layer {self.key}: no term requested cells under {key!r} (KDTerm.plan requests them)")
        return self._requests[key]

    def vectors(self, key: str) -> list[Tensor]:
        """Per sample the (S_b, Cs) student vectors, with gradient, at the cells requested under ``key``.
        The first call gathers every request not yet served, in one operation."""
        if key not in self._vectors:
            pending = [name for name in self._requests if name not in self._vectors]
            if key not in pending:
                self.planned(key)  # raises: never requested
            batch = len(self.alignments)
            per_sample = [torch.cat([self._requests[name][0][index] for name in pending]) for index in range(batch)]
            gathered = gather_cells(self.student, per_sample)
            sizes = [[len(self._requests[name][0][index]) for name in pending] for index in range(batch)]
            parts = [vectors.split(counts) for vectors, counts in zip(gathered, sizes)]
            for position, name in enumerate(pending):
                self._vectors[name] = [sample_parts[position] for sample_parts in parts]
        return self._vectors[key]

    @staticmethod
    def uniform_key(cells_per_sample: int) -> str:
        return f"uniform{int(cells_per_sample)}"

    def request_uniform(self, cells_per_sample: int) -> None:
        """Request per sample up to ``cells_per_sample`` valid cells drawn uniformly without replacement
        (0: every valid cell), drawn once a step per count, so ``mse`` and ``pkd`` compare the same cells."""
        key = self.uniform_key(cells_per_sample)
        if key not in self._requests:
            self.request(key, [self.valid[index].flatten().nonzero().flatten() if cells_per_sample <= 0
                                else sample_cells(self.valid[index], cells_per_sample)
                                for index in range(len(self.alignments))])

    def regression_pairs(self, cells_per_sample: int) -> tuple[Tensor, Tensor]:
        """(N, Cs) student vectors with gradient and (N, Ct) float32 teacher vectors at the cells of
        ``request_uniform(cells_per_sample)`` (requested here when no term planned them)."""
        self.request_uniform(cells_per_sample)
        key = self.uniform_key(cells_per_sample)
        if key not in self._teacher_reads:
            cells, _ = self.planned(key)
            self._teacher_reads[key] = torch.cat([self.teacher.read(index, alignment.read_matrix(sample))
                                                  for index, (alignment, sample) in enumerate(zip(self.alignments,
                                                                                                   cells))])
        return torch.cat(self.vectors(key)), self._teacher_reads[key]


@dataclass
class DistillStep:
    """What the distiller knows about one training step, filled once and read by every term."""

    layers: list[LayerStep]

    def plan(self, terms: "Sequence[KDTerm]") -> None:
        """Let every term request the student cells it reads (``KDTerm.plan``) before any loss is
        computed, so each layer's requests are served by one gather (``LayerStep.vectors``)."""
        for term in terms:
            for layer in term.layers_of(self):
                term.plan(layer)


@dataclass(frozen=True)
class TermContext:
    """What a term needs at construction: per head key of a *feature* pair, the (student, teacher)
    channel counts (terms size their heads and adapters from it); the number of cache rows (CRD's
    memory size); an all-gather for DDP (CRD's memory updates)."""

    channels: dict[str, tuple[int, int]]
    num_samples: int = 1
    gather: Callable[[Tensor], Tensor] | None = None


class KDTerm(nn.Module):
    """A distillation term: ``forward(step) -> {layer key: scalar loss}``, one per distilled pair of
    one of its :attr:`kinds`."""

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("feature",)

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.context = context

    def layers_of(self, step: DistillStep) -> list[LayerStep]:
        """The step's pairs this term distils (those of its :attr:`kinds`)."""
        return [layer for layer in step.layers if layer.kind in self.kinds]

    def forward(self, step: DistillStep) -> dict[str, Tensor]:
        losses = {}
        for layer in self.layers_of(step):
            self.plan(layer)  # a no-op when DistillStep.plan ran; a term used alone plans here
            losses[layer.key] = self.layer_loss(layer)
        return losses

    def plan(self, layer: LayerStep) -> None:
        """Request the student cells ``layer_loss`` will read (``LayerStep.request``); terms that read
        the student map itself request nothing. Must be idempotent and draw at most once per step."""

    def layer_loss(self, layer: LayerStep) -> Tensor:
        raise NotImplementedError


TERMS: dict[str, type[KDTerm]] = {}


def register_term(cls: type[KDTerm]) -> type[KDTerm]:
    TERMS[cls.name] = cls
    return cls


def build_term(name: str, context: TermContext, **params: Any) -> KDTerm:
    """The term ``name`` (a key of :data:`TERMS`) with its parameters; unknown names or parameters
    raise a ValueError naming the valid ones."""
    if name not in TERMS:
        raise ValueError(f"unknown distillation term {name!r}; choose from {', '.join(sorted(TERMS))}")
    import inspect

    accepted = [p for p in inspect.signature(TERMS[name].__init__).parameters if p not in ("self", "context")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"distillation term {name!r} has no parameter {', '.join(unknown)}; "
                         f"it takes {', '.join(accepted) or 'none'}")
    return TERMS[name](context, **params)


def parse_kd_spec(text: str) -> dict[str, float]:
    """``'infonce=1,pkd=5'`` -> ``{'infonce': 1.0, 'pkd': 5.0}``; a bare name weighs 1. Names are checked
    against :data:`TERMS`."""
    spec: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition("=")
        name = name.strip()
        if name not in TERMS:
            raise ValueError(f"--kd {text!r}: unknown term {name!r}; choose from {', '.join(sorted(TERMS))}")
        try:
            spec[name] = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--kd {text!r}: the weight of {name!r} is not a number: {weight!r}") from None
        if not math.isfinite(spec[name]) or spec[name] < 0:
            raise ValueError(f"--kd {text!r}: the weight of {name!r} must be a finite number >= 0")
    if not spec:
        raise ValueError(f"--kd {text!r} names no term; e.g. --kd infonce=1,pkd=5")
    return spec


def _projection_heads(context: TermContext, feat_dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({key: nn.ModuleDict({"student": ProjectionMLP(cs, feat_dim),
                                              "teacher": ProjectionMLP(ct, feat_dim)})
                          for key, (cs, ct) in context.channels.items()})


def _adapters(context: TermContext, always: bool) -> nn.ModuleDict:
    """A 1x1 convolution per pair from the student's channels to the teacher's (identity when equal
    and not ``always``)."""
    return nn.ModuleDict({key: nn.Conv2d(cs, ct, kernel_size=1) if always or cs != ct else nn.Identity()
                          for key, (cs, ct) in context.channels.items()})


@register_term
class CRDTerm(KDTerm):
    """CRD on one embedding per sample: the student map and the warped teacher map, each averaged over
    the sample's valid cells, projected and contrasted against memory banks over cache rows."""

    name = "crd"

    def __init__(self, context: TermContext, feat_dim: int = 128, temperature: float = 0.07,
                 nce_k: int = 4096, momentum: float = 0.5) -> None:
        super().__init__(context)
        if context.num_samples < 2:
            raise ValueError(f"the crd term contrasts samples against each other and needs at least 2 cache rows; "
                             f"this cache has {context.num_samples}. Build the cache over more samples, or use "
                             "a term that works per sample (--kd infonce=1, pkd=1 or mse=1)")
        self.heads = _projection_heads(context, feat_dim)
        self.criteria = nn.ModuleDict({key: CRDLoss(feat_dim, context.num_samples, nce_k=nce_k,
                                                    temperature=temperature, momentum=momentum,
                                                    gather=context.gather) for key in context.channels})

    def layer_loss(self, layer: LayerStep) -> Tensor:
        weights = layer.valid.flatten(1).float()
        denominator = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        pooled_s = (layer.student.flatten(2) * weights[:, None]).sum(dim=2) / denominator
        pooled_t = torch.stack([layer.teacher.weighted_sum(index, alignment.splat(weights[index] / denominator[index]))
                                for index, alignment in enumerate(layer.alignments)])
        heads = self.heads[layer.key]
        return self.criteria[layer.key](heads["student"](pooled_s), heads["teacher"](pooled_t.to(layer.student.dtype)),
                                        layer.rows)


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
        self.heads = _projection_heads(context, feat_dim)
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


def _adapt(adapter: nn.Module, vectors: Tensor) -> Tensor:
    """A 1x1 adapter (or identity) applied to (N, Cs) cell vectors: the same as on the map, only on the
    cells that are compared (as a linear map of the same weights: convolution kernels on (N, C, 1, 1)
    inputs cost several times more)."""
    if isinstance(adapter, nn.Identity):
        return vectors
    return torch.nn.functional.linear(vectors, adapter.weight.flatten(1), adapter.bias)


@register_term
class MSETerm(KDTerm):
    """Masked feature regression: a 1x1 adapter maps the student's cells onto the teacher's channels;
    mean squared error over channels and compared valid cells (``cells_per_sample`` per sample, 0: all)
    against the teacher at the same places of its grid."""

    name = "mse"

    def __init__(self, context: TermContext, cells_per_sample: int = 512) -> None:
        super().__init__(context)
        self.cells_per_sample = int(cells_per_sample)
        self.adapters = _adapters(context, always=True)

    def plan(self, layer: LayerStep) -> None:
        layer.request_uniform(self.cells_per_sample)

    def layer_loss(self, layer: LayerStep) -> Tensor:
        student, teacher = layer.regression_pairs(self.cells_per_sample)
        adapted = _adapt(self.adapters[layer.key], student)
        if not len(adapted):  # no valid cell in the batch: zero, still part of the graph
            return adapted.sum()
        return (adapted - teacher.to(adapted.dtype)).pow(2).mean()


def pkd_standardise(vectors: Tensor, eps: float = 1e-6) -> Tensor:
    """(N, C) cell vectors standardised per channel over the N cells: (x - mean) / (std + eps) with the
    unbiased std, mmrazor's ``PKDLoss.norm`` on the compared cells instead of every cell of the map."""
    mean = vectors.mean(dim=0, keepdim=True)
    var = (vectors - mean).pow(2).sum(dim=0, keepdim=True) / max(len(vectors) - 1, 1)
    return (vectors - mean) / (var.sqrt() + eps)


@register_term
class PKDTerm(KDTerm):
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
        self.adapters = _adapters(context, always=False)

    def plan(self, layer: LayerStep) -> None:
        layer.request_uniform(self.cells_per_sample)

    def layer_loss(self, layer: LayerStep) -> Tensor:
        student, teacher = layer.regression_pairs(self.cells_per_sample)
        adapted = _adapt(self.adapters[layer.key], student)
        if len(adapted) < 2:  # no spread to standardise by: zero, still part of the graph
            return adapted.sum() * 0
        student_n = pkd_standardise(adapted, self.eps)
        teacher_n = pkd_standardise(teacher.to(adapted.dtype), self.eps)
        return (student_n - teacher_n).pow(2).mean() / 2


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
        if loss not in ("mse", "l1"):
            raise ValueError(f"heatmap loss must be 'mse' (SparseKD) or 'l1' (UniDistill), got {loss!r}")
        if gt_weight < 0:
            raise ValueError(f"heatmap gt_weight must be >= 0, got {gt_weight}")
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

    def __init__(self, context: TermContext, loss: str = "l1", beta: float = 0.1, peak_score: float = 0.5) -> None:
        super().__init__(context)
        if loss not in ("l1", "smooth_l1"):
            raise ValueError(f"reg loss must be 'l1' or 'smooth_l1', got {loss!r}")
        if peak_score < 0:
            raise ValueError(f"reg peak_score must be >= 0 (> 1: GT centres only), got {peak_score}")
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

    def __init__(self, context: TermContext, score_thresh: float = 0.5, dedup_distance: float = 1.0) -> None:
        super().__init__(context)
        if not 0 <= score_thresh <= 1:
            raise ValueError(f"label score_thresh must be in [0, 1], got {score_thresh}")
        if dedup_distance < 0:
            raise ValueError(f"label dedup_distance must be >= 0 metres, got {dedup_distance}")
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
