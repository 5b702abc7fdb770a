"""``CacheDistiller``: an mmdet3d student trained with its detection loss plus weighted distillation
terms (``trainer.terms``) against teacher maps that come from a featcache cache (or, for
comparisons, from a teacher run online through the same code path).

The distillation terms live in ``loss()``: mmengine's DDP wrapper calls the data preprocessor,
``forward(mode='loss')`` and ``parse_losses`` itself, never a model's own ``train_step``.
Only loss entries meant for the optimiser contain "loss" (``parse_losses`` sums every such key).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from mmdet3d.registry import MODELS
from mmengine.model import BaseModel
from torch import Tensor, nn

from featcache import codecs
from featcache.errors import ConfigError
from featcache.recording import LayerRecorder
from trainer.bev_warp import BevAlignment, gaussian_foreground
from trainer.heads import head_key
from trainer.targets import TeacherMaps
from trainer.terms import DistillStep, LayerStep, TermContext, build_term
from trainer.transforms import qparams_field, target_field

logger = logging.getLogger("trainer.distiller")
# Below this share of student cells with a teacher target at the first step, the two grids barely
# overlap: the cache was probably built by a teacher with another BEV range than the student's.
LOW_VALID_FRACTION = 0.8


def gather_across_ranks(tensor: Tensor) -> Tensor:
    """Concatenate a tensor from every rank (identity when not distributed), so each rank's CRD
    memory bank receives every rank's update and the banks stay identical."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def module_of(layer: str, module_names: set[str]) -> str:
    """The hooked module behind a recorded layer name ('pts_neck.0' -> 'pts_neck')."""
    if layer in module_names:
        return layer
    module, _, index = layer.rpartition(".")
    if module in module_names and index.isdigit():
        return module
    raise ValueError(f"layer {layer!r} names no module of the student")


def gt_boxes(data_samples: Sequence[Any]) -> list[Any]:
    """Each sample's GT boxes (mmdet3d box structures, None without any), taken before the student's
    loss runs: mmdet3d's anchor heads replace ``gt_instances_3d.bboxes_3d`` by a plain tensor in place
    while assigning targets (``AnchorTrainMixin``)."""
    return [sample.gt_instances_3d.bboxes_3d if "bboxes_3d" in sample.gt_instances_3d else None
            for sample in data_samples]


def gt_labels(data_samples: Sequence[Any]) -> list[Tensor | None]:
    """Each sample's GT label ids (None without any), taken with ``gt_boxes``."""
    return [sample.gt_instances_3d.labels_3d if "labels_3d" in sample.gt_instances_3d else None
            for sample in data_samples]


def gt_foreground(boxes: Sequence[Any], bev_range: Sequence[float], height: int, width: int,
                  device: torch.device, min_radius: int = 2, min_overlap: float = 0.1) -> Tensor:
    """(B, H, W) float in [0, 1]: each sample's GT boxes (``gt_boxes``) as CenterHead-style Gaussians
    (``gaussian_foreground``)."""
    maps = []
    for sample_boxes in boxes:
        if sample_boxes is not None and len(sample_boxes):
            bev = sample_boxes.tensor.to(device)[:, [0, 1, 3, 4, 6]]  # x, y, l, w, yaw
        else:
            bev = torch.zeros(0, 5, device=device)
        maps.append(gaussian_foreground(bev_range, height, width, bev, min_radius, min_overlap))
    return torch.stack(maps)


@MODELS.register_module()
class CacheDistiller(BaseModel):
    """Wraps ``student`` (an mmdet3d detector config) and distils ``pairs`` of its layers.

    Args:
        student: the student model config.
        pairs: student layer -> teacher (cached) layer, e.g. ``{'pts_neck.0': 'pts_neck.0'}``.
        student_shapes / teacher_shapes: per-sample (C, H, W) of each paired layer, probed from
            the student and read from the cache manifest by ``featcache train``.
        student_range / teacher_range: BEV extents [x_min, y_min, x_max, y_max] of the two grids.
        terms: term name (``trainer.terms.TERMS``) -> dict(weight=..., **the term's parameters),
            e.g. ``{'infonce': {'weight': 1.0}, 'pkd': {'weight': 5.0}}``. Each term's loss for each
            pair is logged as ``loss_kd_<term>_<layer>``, already weighted.
        warmup_iters: the weights rise linearly from 1/warmup_iters of their value at the first
            training step to their full value at step ``warmup_iters`` (0: full from the start).
        foreground: dict(min_radius=, min_overlap=) of the GT Gaussian the terms weight cells by.
        num_samples: rows in the cache (CRD's memory size).
        online_teacher: dict(config=..., checkpoint=..., cfg_options=...) to compute targets live
            instead of reading them from data samples (comparisons only; never used with a cache).
        target_codecs: cache layer -> codec name (the manifest's): data samples carry the stored
            values, decoded on the training device; without an entry they are taken as floats.
        regression_pairs: the pairs of ``pairs`` that are CenterHead regression outputs (student module ->
            dict(kind="reg"|"height"|"dim"|"rot"|"vel", labels=[GT label ids of the task's classes the
            teacher also has], log_dims=bool)); read by the ``reg`` term at those boxes' centres.
        heatmap_pairs: the pairs of ``pairs`` that are class heatmaps (student heatmap module ->
            per student channel the teacher channel of the same class, -1 for none); read by response
            terms (``heatmap``), not by the feature terms, which get no heads for them.

    Everything built besides the student (terms' heads and memory banks, the online teacher) is
    drawn from a forked random generator: the student's ``init_weights`` then sees the generator
    exactly as it would without distillation, so every arm of a comparison starts from the same
    student weights for a given seed.
    """

    def __init__(self, student: dict, pairs: dict[str, str], student_shapes: dict[str, Sequence[int]],
                 teacher_shapes: dict[str, Sequence[int]], student_range: Sequence[float],
                 teacher_range: Sequence[float], terms: dict[str, dict] | None = None, warmup_iters: int = 0,
                 foreground: dict | None = None, num_samples: int = 1, online_teacher: dict | None = None,
                 target_codecs: dict[str, str] | None = None, heatmap_pairs: dict[str, Sequence[int]] | None = None,
                 regression_pairs: dict[str, dict] | None = None,
                 init_cfg: dict | None = None) -> None:
        student_model = MODELS.build(student)
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.student = student_model
        self.data_preprocessor = self.student.data_preprocessor  # the student's own voxelisation
        self.pairs = dict(pairs)
        self.heatmap_pairs = {layer: [int(channel) for channel in channels]
                              for layer, channels in (heatmap_pairs or {}).items()}
        self.regression_pairs = {layer: dict(kind=spec["kind"], labels=[int(label) for label in spec["labels"]],
                                             log_dims=bool(spec.get("log_dims", True)))
                                 for layer, spec in (regression_pairs or {}).items()}
        unpaired = sorted((set(self.heatmap_pairs) | set(self.regression_pairs)) - set(self.pairs))
        if unpaired:
            raise ConfigError(f"response pairs {unpaired} are not in pairs {sorted(self.pairs)}")
        self.target_codecs = {layer: codecs.parse_codec(name) for layer, name in (target_codecs or {}).items()}
        self.student_range, self.teacher_range = list(student_range), list(teacher_range)
        self.student_shapes = {name: tuple(shape) for name, shape in student_shapes.items()}
        self.teacher_shapes = {name: tuple(shape) for name, shape in teacher_shapes.items()}
        self.foreground = dict(min_radius=2, min_overlap=0.1, **(foreground or {}))
        self.warmup_iters = int(warmup_iters)
        modules = {name for name, _ in self.student.named_modules() if name}
        self.student_modules = sorted({module_of(layer, modules) for layer in self.pairs})
        context = TermContext(channels={head_key(s): (self.student_shapes[s][0], self.teacher_shapes[t][0])
                                        for s, t in self.pairs.items()
                                        if s not in self.heatmap_pairs and s not in self.regression_pairs},
                              num_samples=num_samples, gather=gather_across_ranks)
        terms = terms if terms is not None else {"crd": {"weight": 1.0}}
        if not terms:
            raise ConfigError("no distillation term configured; name at least one (--kd infonce=1), or train "
                              "with --no-distill")
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        self.teacher = None
        self.teacher_modules: list[str] = []
        # training steps seen (a buffer: a resumed run continues the warm-up where it stopped)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        with torch.random.fork_rng(devices=[]):
            for name, params in terms.items():
                params = dict(params)
                self.weights[name] = float(params.pop("weight", 1.0))
                try:
                    self.terms[name] = build_term(name, context, **params)
                except ValueError as exc:
                    raise ConfigError(f"distillation term {name!r}: {exc}") from exc
            if online_teacher:
                self._build_online_teacher(online_teacher)

    def _build_online_teacher(self, spec: dict) -> None:
        from featcache import models

        cfg = models.load_config(spec["config"], spec.get("cfg_options"))
        teacher = models.build_model(cfg, spec["checkpoint"]).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        modules = {name for name, _ in teacher.named_modules() if name}
        self.teacher_modules = sorted({module_of(layer, modules) for layer in self.pairs.values()})
        # kept outside the module tree: not trained, not saved in checkpoints, not DDP-synchronised
        self.__dict__["teacher"] = teacher

    # -- targets ----------------------------------------------------------------------------

    # -- targets ----------------------------------------------------------------------------
    def _raw_targets(self, inputs: dict, data_samples: list) -> tuple[dict[str, TeacherMaps], bool]:
        """Teacher maps per layer (as stored, decoded where read) and whether they are in the
        un-augmented frame."""
        device = next(self.student.parameters()).device
        if self.teacher is not None:
            from featcache.recording import record_teacher

            self.teacher.to(device)
            batch = {"inputs": {"points": inputs["points"]}, "data_samples": data_samples}
            recorded = record_teacher(self.teacher, batch, self.teacher_modules)
            return {layer: TeacherMaps(list(maps)) for layer, maps in recorded.items()}, False
        targets = {}
        for t_layer in set(self.pairs.values()):
            field = target_field(t_layer)
            missing = [s.metainfo.get("cache_key") for s in data_samples if field not in s.get("cached_targets", {})]
            if missing:
                raise KeyError(f"cached target {t_layer!r} missing for samples {missing}; is the train pipeline's "
                               "last step PackDetInputsWithCache with this layer?")
            # stored values (float16, uint8...) stay as they are; TeacherMaps decodes what is read
            values = [s.cached_targets.get(field).to(device, non_blocking=True) for s in data_samples]
            codec, qparams = self.target_codecs.get(t_layer), None
            if codec is not None and codec.precision == "int8":
                qparams = [s.cached_targets.get(qparams_field(t_layer)).to(device) for s in data_samples]
            targets[t_layer] = TeacherMaps(values, codec, qparams)
        return targets, True

    def _alignments(self, maps: TeacherMaps, student_hw: tuple[int, int], data_samples: list,
                    unaugmented_frame: bool, device: torch.device) -> list[BevAlignment]:
        """Per sample, where the student's grid reads the teacher's (augmentation undone)."""
        return [BevAlignment(self.teacher_range, maps.hw, self.student_range, student_hw,
                             sample.metainfo if unaugmented_frame else {}, device) for sample in data_samples]

    # -- the step's shared view ---------------------------------------------------------------
    def _layer_step(self, s_layer: str, student: Tensor, maps: TeacherMaps, data_samples: list, boxes: list,
                    labels: list, unaugmented_frame: bool) -> LayerStep:
        hw = tuple(student.shape[-2:])
        alignments = self._alignments(maps, hw, data_samples, unaugmented_frame, student.device)
        # memory-bank row: the cache row; with an online teacher and no cache, the dataset index
        rows = torch.as_tensor([s.metainfo.get("cache_row", s.metainfo.get("sample_idx")) for s in data_samples],
                               device=student.device)
        channel_map = self.heatmap_pairs.get(s_layer)
        regression = self.regression_pairs.get(s_layer)
        kind = "heatmap" if channel_map is not None else regression["kind"] if regression else "feature"
        if regression:  # a task's regression outputs answer for its own classes' boxes only
            boxes = [None if sample_boxes is None else sample_boxes[torch.isin(sample_labels.cpu(),
                                                                               torch.tensor(regression["labels"]))]
                     for sample_boxes, sample_labels in zip(boxes, labels)]
        return LayerStep(
            key=head_key(s_layer), student=student, teacher=maps, alignments=alignments, kind=kind,
            channel_map=None if channel_map is None else torch.as_tensor(channel_map, device=student.device),
            log_dims=regression["log_dims"] if regression else True,
            valid=torch.stack([alignment.valid.reshape(hw) for alignment in alignments]),
            foreground=gt_foreground(boxes, self.student_range, *hw, student.device, **self.foreground),
            boxes=[self._boxes_in_cells(sample_boxes, hw, student.device) for sample_boxes in boxes], rows=rows)

    def _boxes_in_cells(self, boxes: Any, hw: Sequence[int], device: torch.device) -> Tensor:
        """GT boxes (a sample's ``gt_boxes``) as axis-aligned [x1, y1, x2, y2] in student feature-cell
        coordinates."""
        if boxes is None:
            return torch.zeros(0, 4, device=device)
        corners = boxes.corners[..., :2].to(device)  # (N, 8, 2)
        x_min, y_min, x_max, y_max = self.student_range
        scale = torch.tensor([hw[1] / (x_max - x_min), hw[0] / (y_max - y_min)], device=device)
        cells = (corners - torch.tensor([x_min, y_min], device=device)) * scale
        return torch.cat([cells.min(dim=1).values, cells.max(dim=1).values], dim=1)

    def weight_scale(self) -> float:
        """The warm-up factor of every term's weight at the current step (1 after ``warmup_iters``)."""
        if self.warmup_iters <= 0:
            return 1.0
        return min(1.0, (int(self.steps) + 1) / self.warmup_iters)

    def _warn_low_overlap(self, step: DistillStep) -> None:
        for layer in step.layers:
            fraction = float(layer.valid.float().mean())
            if fraction < LOW_VALID_FRACTION:
                logger.warning(
                    "only %.0f%% of the student's %s cells have a teacher target at the first step: the "
                    "teacher's BEV range %s and the student's %s barely overlap (after augmentation). "
                    "Is the cache from a teacher with another point_cloud_range? Distillation still runs, "
                    "on those cells only.", 100 * fraction, layer.key, self.teacher_range, self.student_range)

    def loss(self, inputs: dict, data_samples: list) -> dict[str, Tensor]:
        recorder = LayerRecorder(self.student, self.student_modules, detach=False)
        boxes, labels = gt_boxes(data_samples), gt_labels(data_samples)
        with recorder:
            losses = self.student.loss(inputs, data_samples)
        raw, unaugmented_frame = self._raw_targets(inputs, data_samples)
        step = DistillStep([self._layer_step(s_layer, recorder.outputs[s_layer], raw[t_layer], data_samples,
                                             boxes, labels, unaugmented_frame)
                             for s_layer, t_layer in self.pairs.items()])
        if self.training and int(self.steps) == 0:
            self._warn_low_overlap(step)
        scale = self.weight_scale()
        for name, term in self.terms.items():
            for key, value in term(step).items():
                losses[f"loss_kd_{name}_{key}"] = (self.weights[name] * scale) * value
        for layer in step.layers:
            losses[f"kd_valid_fraction_{layer.key}"] = layer.valid.float().mean().detach()
        if self.training:
            self.steps += 1
        return losses

    def predict(self, inputs: dict, data_samples: list) -> list:
        return self.student.predict(inputs, data_samples)

    def _forward(self, inputs: dict, data_samples: list | None = None):
        return self.student._forward(inputs, data_samples)

    def forward(self, inputs: dict, data_samples: list | None = None, mode: str = "tensor"):
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        return self._forward(inputs, data_samples)
