"""``CacheDistiller``: an mmdet3d student trained with its detection loss plus weighted distillation
terms (``trainer.terms``: one module per term) against teacher maps that come from a featcache cache
(or, for comparisons, from a teacher run online through the same code path). What a term needs (the
kinds of pairs it reads, whether it adds to the GT) is asked of the term, never decided by its name.

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
from mmengine.structures import InstanceData
from torch import Tensor, nn

from featcache import codecs
from featcache.errors import ConfigError
from featcache.format import parse_layer_name
from featcache.layout import CANONICAL, BevLayout
from featcache.teacher.recording import LayerRecorder
from trainer.bev_warp import BevAlignment, gaussian_foreground
from trainer.heads import head_key
from trainer.targets import TeacherMaps
from trainer.terms import DistillStep, LayerStep, TermContext, build_term
from trainer.transforms import qparams_field, target_field
from trainer.unlabelled import is_labelled, labelled_first, pseudo_label, split_inputs, teacher_only_forward

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
    parsed = parse_layer_name(layer, module_names)
    if parsed is not None:
        return parsed[0]
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
        teacher_layouts: cache layer -> its BEV layout's name (``featcache.layout``: "yx", rows = y, mmdet3d's;
            "xy", rows = x, BEVFusion's), as the cache manifest records it or the online teacher's maps
            measured; a layer without an entry is read as "yx".
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
                 regression_pairs: dict[str, dict] | None = None, teacher_boxes: bool = False,
                 box_label_map: Sequence[int] | None = None, teacher_layouts: dict[str, str] | None = None,
                 pseudo_label_score: float | None = None, init_cfg: dict | None = None) -> None:
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
        self.teacher_layouts = {layer: BevLayout.parse(name) for layer, name in (teacher_layouts or {}).items()}
        self.student_shapes = {name: tuple(shape) for name, shape in student_shapes.items()}
        self.teacher_shapes = {name: tuple(shape) for name, shape in teacher_shapes.items()}
        self.foreground = dict(min_radius=2, min_overlap=0.1, **(foreground or {}))
        self.warmup_iters = int(warmup_iters)
        self.teacher_boxes = bool(teacher_boxes)
        self.pseudo_label_score = None if pseudo_label_score is None else float(pseudo_label_score)
        if self.pseudo_label_score is not None and not self.teacher_boxes:
            raise ConfigError("pseudo_label_score (hard pseudo-labels on unlabelled scans) needs the teacher's boxes "
                              "(teacher_boxes=True, a cache built with --boxes)")
        self.box_label_map = [int(label) for label in box_label_map or ()]
        if self.teacher_boxes and online_teacher and not self.box_label_map:
            raise ConfigError("an online teacher's boxes need box_label_map (teacher label -> student label)")
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
                if self.terms[name].changes_gt and self.weights[name] not in (0.0, 1.0):
                    raise ConfigError(f"{name}={self.weights[name]:g}: the {name} term adds teacher boxes to the GT "
                                      "of the student's detection loss, which weighs them like GT; give "
                                      f"{name}=1 (or 0: off) and its parameters in the student config's "
                                      f"distill.terms.{name}")
            if online_teacher:
                self._build_online_teacher(online_teacher)

    def _build_online_teacher(self, spec: dict) -> None:
        from featcache.teacher import models

        cfg = models.load_config(spec["config"], spec.get("cfg_options"))
        teacher = models.build_model(cfg, spec["checkpoint"]).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        modules = {name for name, _ in teacher.named_modules() if name}
        self.teacher_modules = sorted({module_of(layer, modules) for layer in self.pairs.values()})
        # kept outside the module tree: not trained, not saved in checkpoints, not DDP-synchronised
        self.__dict__["teacher"] = teacher

    # -- targets ----------------------------------------------------------------------------
    def _raw_targets(self, inputs: dict, data_samples: list
                     ) -> tuple[dict[str, TeacherMaps], bool, list[InstanceData] | None]:
        """Teacher maps per layer (as stored, decoded where read), whether they are in the un-augmented
        frame, and per sample the teacher's boxes in the augmented frame with student labels (None when
        the run has none)."""
        device = next(self.student.parameters()).device
        if self.teacher is not None:
            from featcache.teacher.recording import record_teacher, record_teacher_and_predict

            self.teacher.to(device)
            batch = {"inputs": {"points": inputs["points"]}, "data_samples": data_samples}
            if not self.teacher_boxes:
                recorded = record_teacher(self.teacher, batch, self.teacher_modules)
                return {layer: TeacherMaps(list(maps)) for layer, maps in recorded.items()}, False, None
            recorded, predictions = record_teacher_and_predict(self.teacher, batch, self.teacher_modules)
            boxes = [self._online_boxes(prediction, device) for prediction in predictions]
            return {layer: TeacherMaps(list(maps)) for layer, maps in recorded.items()}, False, boxes
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
            if codec is not None and codec.has_qparams:
                qparams = [s.cached_targets.get(qparams_field(t_layer)).to(device) for s in data_samples]
            targets[t_layer] = TeacherMaps(values, codec, qparams)
        if not self.teacher_boxes:
            return targets, True, None
        missing = [s.metainfo.get("cache_key") for s in data_samples if "teacher_instances_3d" not in s]
        if missing:
            raise KeyError(f"teacher boxes missing for samples {missing}; is the train pipeline's last step "
                           "PackDetInputsWithCache with teacher_boxes=dict(classes=...)?")
        return targets, True, [s.teacher_instances_3d.to(device) for s in data_samples]

    def _online_boxes(self, prediction: Any, device: torch.device) -> InstanceData:
        """The online teacher's prediction for one augmented sample, labelled in the student's classes
        (``box_label_map``; classes the student lacks dropped) and kept inside the student's BEV range."""
        instances = prediction.pred_instances_3d
        labels = torch.as_tensor(self.box_label_map, device=device)[instances.labels_3d.to(device)]
        boxes = instances.bboxes_3d.to(device)
        keep = (labels >= 0) & boxes.in_range_bev(self.student_range).to(device)
        return InstanceData(bboxes_3d=boxes[keep], scores_3d=instances.scores_3d.to(device)[keep],
                            labels_3d=labels[keep])

    def _add_label_targets(self, term: nn.Module, data_samples: list, teacher: list[InstanceData]) -> Tensor:
        """Label KD: each sample's teacher boxes that ``term.extra_targets`` (a term that ``changes_gt``,
        ``LabelTerm``) keeps join its GT (in place, before the student's loss assigns targets). Returns the
        mean number added per sample."""
        added = []
        for sample, boxes in zip(data_samples, teacher):
            gt = sample.gt_instances_3d
            gt_boxes_3d = gt.bboxes_3d
            keep = term.extra_targets(gt_boxes_3d.tensor[:, :2], boxes.bboxes_3d.tensor[:, :2], boxes.scores_3d)
            keep &= self._plausible(boxes.bboxes_3d.tensor).to(keep.device)
            if keep.any():
                if boxes.bboxes_3d.tensor.shape[1] != gt_boxes_3d.tensor.shape[1]:
                    raise ConfigError(f"label KD: the teacher's boxes have {boxes.bboxes_3d.tensor.shape[1]} fields, "
                                      f"the student's GT {gt_boxes_3d.tensor.shape[1]} (sample "
                                      f"{sample.metainfo.get('cache_key')}); distil a teacher that predicts the "
                                      "fields the student is trained on (velocity)")
                others = sorted(set(gt.keys()) - {"bboxes_3d", "labels_3d"})
                if others:
                    raise ConfigError(f"label KD extends each sample's GT boxes and labels, and this GT also holds "
                                      f"{others}, which teacher boxes have no value for")
                extra = boxes.bboxes_3d[keep]
                sample.gt_instances_3d = InstanceData(
                    metainfo=gt.metainfo, bboxes_3d=gt_boxes_3d.cat([gt_boxes_3d, extra.to(gt_boxes_3d.device)]),
                    labels_3d=torch.cat([gt.labels_3d, boxes.labels_3d[keep].to(gt.labels_3d)]))
            added.append(float(keep.sum()))
        return torch.tensor(sum(added) / max(len(added), 1))

    def _plausible(self, boxes: Tensor) -> Tensor:
        """(K,) bool: boxes a detection loss can take as GT: finite fields, extents > 0 and no longer than
        the student's BEV range. An untrained or diverged teacher predicts exp(log-extent) boxes of any
        size, and CenterHead would draw a Gaussian as wide as the box for each."""
        x_min, y_min, x_max, y_max = self.student_range
        extents = boxes[:, 3:6]
        return (torch.isfinite(boxes).all(dim=1) & (extents > 0).all(dim=1)
                & (extents[:, :2] <= max(x_max - x_min, y_max - y_min)).all(dim=1))

    # -- the step's shared view ---------------------------------------------------------------
    def _step(self, recorded: dict[str, Tensor], raw: dict[str, TeacherMaps], data_samples: list, boxes: list,
              labels: list, teacher: list[InstanceData] | None, unaugmented_frame: bool) -> DistillStep:
        """Every pair's ``LayerStep``. What depends only on the grids (alignments, valid cells, the GT
        Gaussian, boxes in cells) is computed once per grid and step and shared by the pairs on it: the
        demo's recipe distils 24 head outputs of one grid."""
        device = next(self.student.parameters()).device
        # memory-bank row: the cache row; with an online teacher and no cache, the dataset index
        rows = torch.as_tensor([s.metainfo.get("cache_row", s.metainfo.get("sample_idx")) for s in data_samples],
                               device=device)
        alignments: dict[tuple, tuple[list[BevAlignment], Tensor]] = {}
        grids: dict[tuple[int, int], tuple[Tensor, list[Tensor], list[Tensor] | None]] = {}
        layers = []
        for s_layer, t_layer in self.pairs.items():
            student, maps = recorded[s_layer], raw[t_layer]
            hw = tuple(student.shape[-2:])
            layout = self.teacher_layouts.get(t_layer, CANONICAL)
            if (maps.hw, layout, hw) not in alignments:
                aligned = [BevAlignment(self.teacher_range, maps.hw, self.student_range, hw,
                                        sample.metainfo if unaugmented_frame else {}, device, layout)
                           for sample in data_samples]
                alignments[(maps.hw, layout, hw)] = aligned, torch.stack([alignment.valid.reshape(hw)
                                                                          for alignment in aligned])
            if hw not in grids:
                grids[hw] = (gt_foreground(boxes, self.student_range, *hw, device, **self.foreground),
                             [self._boxes_in_cells(sample_boxes, hw, device) for sample_boxes in boxes],
                             None if teacher is None else [self._boxes_in_cells(t.bboxes_3d, hw, device) for t in teacher])
            aligned, valid = alignments[(maps.hw, layout, hw)]
            foreground, box_cells, teacher_cells = grids[hw]
            teacher_scores = None if teacher is None else [t.scores_3d for t in teacher]
            channel_map = self.heatmap_pairs.get(s_layer)
            regression = self.regression_pairs.get(s_layer)
            kind = "heatmap" if channel_map is not None else regression["kind"] if regression else "feature"
            if regression:  # a task's regression outputs answer for its own classes' boxes only
                task = torch.tensor(regression["labels"], device=device)
                box_cells = [cells[torch.isin(sample_labels.to(device), task)] if sample_labels is not None else cells
                             for cells, sample_labels in zip(box_cells, labels)]
                if teacher is not None:
                    own = [torch.isin(t.labels_3d.to(device), task) for t in teacher]
                    teacher_cells = [cells[mask] for cells, mask in zip(teacher_cells, own)]
                    teacher_scores = [scores[mask] for scores, mask in zip(teacher_scores, own)]
            layers.append(LayerStep(
                key=head_key(s_layer), student=student, teacher=maps, alignments=aligned, kind=kind,
                channel_map=None if channel_map is None else torch.as_tensor(channel_map, device=device),
                log_dims=regression["log_dims"] if regression else True, valid=valid, foreground=foreground,
                boxes=box_cells, rows=rows, teacher_boxes=teacher_cells, teacher_scores=teacher_scores))
        return DistillStep(layers)

    def _boxes_in_cells(self, boxes: Any, hw: Sequence[int], device: torch.device) -> Tensor:
        """Boxes (mmdet3d box structures, or None) as axis-aligned [x1, y1, x2, y2] in student feature-cell
        coordinates."""
        if boxes is None or not len(boxes):
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

    def _student_forward(self, inputs: dict, data_samples: list) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The student's detection losses and its recorded layers. Labelled samples (all of them, but with
        ``--unlabelled``) go through the student's own loss; teacher-only samples (``is_labelled`` False, placed
        after them by ``loss``) through its forward alone (``teacher_only_forward``), never its loss, and their
        layers are recorded after the labelled ones'."""
        labelled = sum(1 for sample in data_samples if is_labelled(sample))
        parts = [(inputs, data_samples)] if labelled == len(data_samples) else [
            (split_inputs(self.data_preprocessor, inputs, range(labelled), data_samples[:labelled]), data_samples[:labelled]),
            (split_inputs(self.data_preprocessor, inputs, range(labelled, len(data_samples)), data_samples[labelled:]),
             data_samples[labelled:])]
        recorded: list[dict[str, Tensor]] = []
        losses: dict[str, Tensor] = {}
        for number, (part_inputs, part_samples) in enumerate(parts):
            # heatmaps as the head produced them (logits): the head's own loss turns them into scores in place
            recorder = LayerRecorder(self.student, self.student_modules, detach=False, clone=self.heatmap_pairs)
            with recorder:
                if number == 0:
                    losses = self.student.loss(part_inputs, part_samples)
                else:
                    teacher_only_forward(self.student, part_inputs, part_samples)
            changed = [layer for layer in recorder.modified() if layer in self.pairs]
            if changed:
                raise ConfigError(f"the student's own loss changed {', '.join(changed)} in place after the layer ran, so "
                                  "a distillation term would read altered values; distil another layer, or report the "
                                  "head (featcache copies heatmaps for this reason)")
            recorded.append(recorder.outputs)
        if len(recorded) == 1:
            return losses, recorded[0]
        return losses, {layer: torch.cat([part[layer] for part in recorded]) for layer in recorded[0]}

    def loss(self, inputs: dict, data_samples: list) -> dict[str, Tensor]:
        pseudo = 0
        if self.pseudo_label_score is not None:  # the hard pseudo-label baseline: teacher boxes as their GT
            pseudo = sum(pseudo_label(sample, self.pseudo_label_score, self._plausible) for sample in data_samples
                         if not is_labelled(sample))
        # teacher-only samples (--unlabelled) after the labelled ones, whose detection loss they never reach
        data_samples, inputs, unlabelled = labelled_first(inputs, data_samples)
        # GT as annotated (and pasted), taken before label KD adds teacher boxes and before the student's
        # loss runs (anchor heads replace the boxes in place)
        boxes, labels = gt_boxes(data_samples), gt_labels(data_samples)
        raw, unaugmented_frame, teacher = self._raw_targets(inputs, data_samples)
        added = {}  # per term that changes the GT (label KD): teacher boxes added per sample
        if teacher is not None:
            for name, term in self.terms.items():
                if term.changes_gt and self.weights[name] > 0:
                    added[name] = self._add_label_targets(term, data_samples, teacher)
        losses, recorded = self._student_forward(inputs, data_samples)
        step = self._step(recorded, raw, data_samples, boxes, labels, teacher, unaugmented_frame)
        if self.training and int(self.steps) == 0:
            self._warn_low_overlap(step)
        step.plan(list(self.terms.values()))  # every term's cell requests first: one gather per layer
        scale = self.weight_scale()
        for name, term in self.terms.items():
            for key, value in term(step).items():
                losses[f"loss_kd_{name}_{key}"] = (self.weights[name] * scale) * value
        for layer in step.layers:
            losses[f"kd_valid_fraction_{layer.key}"] = layer.valid.float().mean().detach()
        for name, boxes_per_sample in added.items():
            losses[f"kd_{name}_boxes_per_sample"] = boxes_per_sample
        if unlabelled:
            losses["kd_unlabelled_samples"] = torch.tensor(float(unlabelled))
        if self.pseudo_label_score is not None:
            losses["kd_pseudo_labels_per_step"] = torch.tensor(float(pseudo))
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
