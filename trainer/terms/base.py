"""What every distillation term shares: the per-step view (:class:`LayerStep`, :class:`DistillStep`), what a
term is built from (:class:`TermContext`), the base class with what a term declares (:class:`KDTerm`), the
registry (:data:`TERMS`, :func:`build_term`) and ``--kd`` parsing (:func:`parse_kd_spec`).

The distiller fills one :class:`DistillStep` per training step (student maps, teacher maps as the
cache handed them out, the per-sample alignment of the two grids, ``valid`` and foreground masks,
GT boxes, cache rows) and every configured term reads what it needs from it. What a term needs from
the run (the kinds of pairs it reads, the cache rows it needs, whether it adds to the GT, whether it
reads the teacher's boxes, its parameters and their defaults) is declared on its class: ``featcache
train`` and the distiller ask those declarations and never name a term.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from trainer.bev_warp import BevAlignment
from trainer.heads import ProjectionMLP
from trainer.targets import TeacherMaps
from trainer.terms.cells import gather_cells, sample_cells

__all__ = ["LayerStep", "DistillStep", "TermContext", "KDTerm", "TERMS", "register_term", "build_term",
           "parse_kd_spec", "projection_heads", "channel_adapters", "adapt", "CellRegressionTerm"]


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
    one of its :attr:`kinds`.

    What a term needs from the run is declared here, on the class, so that ``featcache train`` and the
    distiller ask the term instead of naming it: :attr:`kinds`, :attr:`min_samples`, :attr:`changes_gt`,
    :meth:`reads_teacher_boxes` (and :attr:`without_teacher_boxes`), :meth:`parameters` and :meth:`defaults`.
    """

    name: ClassVar[str] = ""
    #: the kinds of pairs the term reads: ``"feature"`` (hooked layers) or head-output kinds; () reads none
    kinds: ClassVar[tuple[str, ...]] = ("feature",)
    #: the fewest cache rows (samples) the term works with
    min_samples: ClassVar[int] = 1
    #: the term adds the teacher's boxes to the GT of the student's detection loss (before it runs) and
    #: has no loss of its own, so its weight is 1 (on) or 0 (off)
    changes_gt: ClassVar[bool] = False
    #: what the term does when it reads the teacher's boxes and the run has none (logged); a term that
    #: ``changes_gt`` cannot work without them
    without_teacher_boxes: ClassVar[str] = ""

    @classmethod
    def parameters(cls) -> list[str]:
        """The names of the term's parameters (its constructor's, after ``context``)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "context")]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The term's parameters' default values."""
        return {name: parameter.default for name, parameter in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "context") and parameter.default is not inspect.Parameter.empty}

    @classmethod
    def reads_teacher_boxes(cls, params: Mapping[str, Any]) -> bool:
        """Whether the term, with ``params`` (the run's; the rest default), reads the teacher's boxes
        (``featcache build --boxes``)."""
        return cls.changes_gt

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


def check_parameter(valid: bool, term: str, rule: str, value: Any) -> None:
    """Refuse a term's parameter with one message shape, ``<term> <rule>, got <value>`` (``value`` as given)."""
    if not valid:
        raise ValueError(f"{term} {rule}, got {value}")


def register_term(cls: type[KDTerm]) -> type[KDTerm]:
    TERMS[cls.name] = cls
    return cls


def build_term(name: str, context: TermContext, **params: Any) -> KDTerm:
    """The term ``name`` (a key of :data:`TERMS`) with its parameters; unknown names or parameters
    raise a ValueError naming the valid ones."""
    if name not in TERMS:
        raise ValueError(f"unknown distillation term {name!r}; choose from {', '.join(sorted(TERMS))}")
    accepted = TERMS[name].parameters()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"distillation term {name!r} has no parameter {', '.join(unknown)}; "
                         f"it takes {', '.join(accepted) or 'none'}")
    if context.num_samples < TERMS[name].min_samples:  # the one check of KDTerm.min_samples
        raise ValueError(f"the {name} term needs at least {TERMS[name].min_samples} cached samples (cache rows); the "
                         f"cache has {context.num_samples}. Build the cache over more samples, or use a term that works "
                         "per sample (--kd infonce=1, pkd=1 or mse=1)")
    return TERMS[name](context, **params)


def parse_kd_spec(text: str) -> dict[str, float | dict[str, Any]]:
    """``'infonce=1,pkd=5'`` -> ``{'infonce': 1.0, 'pkd': 5.0}``; a bare name weighs 1. A term's parameters
    follow its weight after colons: ``'heatmap=2:loss=focal,reg=1'`` -> ``{'heatmap': {'weight': 2.0, 'loss':
    'focal'}, 'reg': 1.0}`` (a number is read as a float, ``true``/``false`` as booleans, anything else as
    text), so a recipe is one string whatever the student config's ``distill.terms`` say. Names are checked
    against :data:`TERMS`, parameter names against the term's (:meth:`KDTerm.parameters`)."""
    spec: dict[str, float | dict[str, Any]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, *settings = item.split(":")
        name, sep, weight_text = head.partition("=")
        name = name.strip()
        if name not in TERMS:
            raise ValueError(f"--kd {text!r}: unknown term {name!r}; choose from {', '.join(sorted(TERMS))}")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ValueError(f"--kd {text!r}: the weight of {name!r} is not a number: {weight_text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--kd {text!r}: the weight of {name!r} must be a finite number >= 0")
        if not settings:
            spec[name] = weight
            continue
        params: dict[str, Any] = {"weight": weight}
        for setting in settings:
            key, has_value, value = (part.strip() for part in setting.partition("="))
            if not has_value or key not in TERMS[name].parameters():
                raise ValueError(f"--kd {text!r}: {setting!r} is not PARAMETER=VALUE of {name!r}, which takes "
                                 f"{', '.join(TERMS[name].parameters()) or 'none'}")
            params[key] = _parameter_value(value)
        spec[name] = params
    if not spec:
        raise ValueError(f"--kd {text!r} names no term; e.g. --kd infonce=1,pkd=5")
    return spec


def _parameter_value(text: str) -> Any:
    """A ``--kd`` parameter's value: a float where it reads as a number, a bool for true/false, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


def projection_heads(context: TermContext, feat_dim: int) -> nn.ModuleDict:
    """Per pair a student and a teacher ``ProjectionMLP`` onto ``feat_dim`` (created in that order)."""
    return nn.ModuleDict({key: nn.ModuleDict({"student": ProjectionMLP(cs, feat_dim),
                                              "teacher": ProjectionMLP(ct, feat_dim)})
                          for key, (cs, ct) in context.channels.items()})


def channel_adapters(context: TermContext, always: bool) -> nn.ModuleDict:
    """A 1x1 convolution per pair from the student's channels to the teacher's (identity when equal
    and not ``always``)."""
    return nn.ModuleDict({key: nn.Conv2d(cs, ct, kernel_size=1) if always or cs != ct else nn.Identity()
                          for key, (cs, ct) in context.channels.items()})


def adapt(adapter: nn.Module, vectors: Tensor) -> Tensor:
    """A 1x1 adapter (or identity) applied to (N, Cs) cell vectors: the same as on the map, only on the
    cells that are compared (as a linear map of the same weights: convolution kernels on (N, C, 1, 1)
    inputs cost several times more)."""
    if isinstance(adapter, nn.Identity):
        return vectors
    return torch.nn.functional.linear(vectors, adapter.weight.flatten(1), adapter.bias)


class CellRegressionTerm(KDTerm):
    """A term that compares the student's and the teacher's vectors at the same ``cells_per_sample`` valid
    cells per sample, drawn uniformly once a step (``LayerStep.request_uniform``; 0: every valid cell), the
    student's through its pair's 1x1 adapter (``self.adapters``, made by the subclass)."""

    cells_per_sample: int
    adapters: nn.ModuleDict

    def plan(self, layer: LayerStep) -> None:
        layer.request_uniform(self.cells_per_sample)

    def adapted_pairs(self, layer: LayerStep) -> tuple[Tensor, Tensor]:
        """(N, Ct) adapted student vectors with gradient and (N, Ct) float32 teacher vectors."""
        student, teacher = layer.regression_pairs(self.cells_per_sample)
        return adapt(self.adapters[layer.key], student), teacher
