"""``CacheDistiller``: an mmdet3d student trained with its detection loss plus a distillation
loss against teacher features that come from a featcache cache (or, for comparisons, from a
teacher run online through the same code path).

The distillation term lives in ``loss()``: mmengine's DDP wrapper calls the data preprocessor,
``forward(mode='loss')`` and ``parse_losses`` itself, never a model's own ``train_step``.
Only loss entries meant for the optimiser contain "loss" (``parse_losses`` sums every such key).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from mmdet3d.registry import MODELS
from mmengine.model import BaseModel
from torch import Tensor, nn

from featcache import codecs
from featcache.recording import LayerRecorder
from trainer.bev_warp import BevAlignment, boxes_on_grid
from trainer.heads import ProjectionMLP, head_key
from trainer.losses import (CRDLoss, InfoNCELoss, MaskedMSELoss, box_cells, gather_cells, instance_infonce,
                            mean_by_box)
from trainer.targets import TeacherMaps
from trainer.transforms import qparams_field, target_field

LOSSES = ("crd", "infonce", "mse")


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


def gt_box_masks(data_samples: Sequence[Any], bev_range: Sequence[float], height: int, width: int,
                 device: torch.device) -> Tensor:
    """(B, H, W) float: 1 for BEV cells whose centre lies inside a GT box (rotated), else 0."""
    masks = []
    for sample in data_samples:
        if "bboxes_3d" in sample.gt_instances_3d and len(sample.gt_instances_3d.bboxes_3d):
            boxes = sample.gt_instances_3d.bboxes_3d.tensor.to(device)[:, [0, 1, 3, 4, 6]]  # x, y, l, w, yaw
        else:
            boxes = torch.zeros(0, 5, device=device)
        masks.append(boxes_on_grid(bev_range, height, width, boxes).float())
    return torch.stack(masks)


@MODELS.register_module()
class CacheDistiller(BaseModel):
    """Wraps ``student`` (an mmdet3d detector config) and distils ``pairs`` of its layers.

    Args:
        student: the student model config.
        pairs: student layer -> teacher (cached) layer, e.g. ``{'pts_neck.0': 'pts_neck.0'}``.
        student_shapes / teacher_shapes: per-sample (C, H, W) of each paired layer, probed from
            the student and read from the cache manifest by ``featcache train``.
        student_range / teacher_range: BEV extents [x_min, y_min, x_max, y_max] of the two grids.
        loss: 'crd' (pooled features, memory banks over cache rows), 'infonce' (BEV cells with
            foreground-weighted sampling, plus GT instances) or 'mse' (masked regression).
        num_samples: rows in the cache (CRD's memory size).
        online_teacher: dict(config=..., checkpoint=..., cfg_options=...) to compute targets live
            instead of reading them from data samples (comparisons only; never used with a cache).
        target_codecs: cache layer -> codec name (the manifest's): data samples carry the stored
            values, decoded on the training device; without an entry they are taken as floats.
    """

    def __init__(self, student: dict, pairs: dict[str, str], student_shapes: dict[str, Sequence[int]],
                 teacher_shapes: dict[str, Sequence[int]], student_range: Sequence[float],
                 teacher_range: Sequence[float], loss: str = "crd", alpha: float = 1.0, temperature: float = 0.07,
                 feat_dim: int = 128, num_samples: int = 1, nce_k: int = 4096, cells_per_sample: int = 256,
                 online_teacher: dict | None = None, target_codecs: dict[str, str] | None = None,
                 init_cfg: dict | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
        student_model = MODELS.build(student)
        super().__init__(data_preprocessor=None, init_cfg=init_cfg)
        self.student = student_model
        self.data_preprocessor = self.student.data_preprocessor  # the student's own voxelisation
        self.pairs = dict(pairs)
        self.loss_name, self.alpha, self.temperature = loss, alpha, temperature
        self.target_codecs = {layer: codecs.parse_codec(name) for layer, name in (target_codecs or {}).items()}
        self.student_range, self.teacher_range = list(student_range), list(teacher_range)
        self.student_shapes = {name: tuple(shape) for name, shape in student_shapes.items()}
        self.teacher_shapes = {name: tuple(shape) for name, shape in teacher_shapes.items()}
        modules = {name for name, _ in self.student.named_modules() if name}
        self.student_modules = sorted({module_of(layer, modules) for layer in self.pairs})
        self.heads = nn.ModuleDict()
        self.criteria = nn.ModuleDict()
        for s_layer, t_layer in self.pairs.items():
            key = head_key(s_layer)
            s_channels, t_channels = self.student_shapes[s_layer][0], self.teacher_shapes[t_layer][0]
            if loss == "mse":
                self.heads[key] = nn.ModuleDict({"student": nn.Conv2d(s_channels, t_channels, kernel_size=1)})
                self.criteria[key] = MaskedMSELoss()
                continue
            self.heads[key] = nn.ModuleDict({"student": ProjectionMLP(s_channels, feat_dim),
                                             "teacher": ProjectionMLP(t_channels, feat_dim)})
            self.criteria[key] = (CRDLoss(feat_dim, num_samples, nce_k=nce_k, temperature=temperature,
                                          gather=gather_across_ranks)
                                  if loss == "crd" else InfoNCELoss(cells_per_sample, temperature))
        self.teacher = None
        self.teacher_modules: list[str] = []
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

    # -- losses -----------------------------------------------------------------------------
    def _distill(self, key: str, student: Tensor, maps: TeacherMaps, alignments: list[BevAlignment],
                 data_samples: list) -> Tensor:
        heads, criterion = self.heads[key], self.criteria[key]
        hw = tuple(student.shape[-2:])
        valid = torch.stack([alignment.valid.reshape(hw) for alignment in alignments])
        if self.loss_name == "mse":
            warped = torch.stack([alignment.warp(maps.decoded(index)) for index, alignment in enumerate(alignments)])
            return criterion(heads["student"](student), warped.to(student.dtype), valid)
        if self.loss_name == "crd":
            weights = valid.flatten(1).float()
            denominator = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
            pooled_s = (student.flatten(2) * weights[:, None]).sum(dim=2) / denominator
            pooled_t = torch.cat([self._pooled_teacher(maps, index, alignment, weights[index] / denominator[index])
                                  for index, alignment in enumerate(alignments)])
            # memory-bank row: the cache row; with an online teacher and no cache, the dataset index
            rows = torch.as_tensor([s.metainfo.get("cache_row", s.metainfo.get("sample_idx")) for s in data_samples],
                                   device=student.device)
            return criterion(heads["student"](pooled_s), heads["teacher"](pooled_t.to(student.dtype)), rows)
        # Only sampled cells and box-pooled vectors are read and projected, never whole maps.
        project = (heads["student"], heads["teacher"])
        foreground = gt_box_masks(data_samples, self.student_range, *hw, student.device)

        def teacher_at(index: int, cells: Tensor) -> Tensor:
            return maps.read(index, alignments[index].read_matrix(cells)).to(student.dtype)

        sampled = criterion.sample(student, valid, foreground)
        boxes = [self._boxes_in_cells(sample, hw, student.device) for sample in data_samples]
        covered = [box_cells(sample_boxes, *hw) for sample_boxes in boxes]
        # one gather for sampled and box cells: each gather's backward zero-fills a whole-batch gradient
        gathered = gather_cells(student, [torch.cat([cells, box_cell]) for cells, (box_cell, _) in zip(sampled, covered)])
        keys = [teacher_at(index, cells) for index, cells in enumerate(sampled)]
        cells_term = criterion.from_vectors([part[:len(cells)] for part, cells in zip(gathered, sampled)], keys, project)
        instance_terms = []
        for index, (sample_boxes, (box_cell, owner)) in enumerate(zip(boxes, covered)):
            if len(sample_boxes) < 2:  # no negatives
                continue
            counts = torch.bincount(owner, minlength=len(sample_boxes)).float()
            teacher_means = maps.read(index, alignments[index].read_matrix(box_cell, owner, 1.0 / counts[owner],
                                                                           len(sample_boxes)))
            student_means = mean_by_box(gathered[index][len(sampled[index]):], owner, len(sample_boxes))
            instance_terms.append(instance_infonce(heads["student"](student_means),
                                                   heads["teacher"](teacher_means.to(student.dtype)),
                                                   self.temperature))
        instance_term = torch.stack(instance_terms).mean() if instance_terms else cells_term.new_zeros(())
        return cells_term + instance_term

    @staticmethod
    def _pooled_teacher(maps: TeacherMaps, index: int, alignment: BevAlignment, cell_weights: Tensor) -> Tensor:
        """(1, C): the teacher map warped onto the student grid, summed with ``cell_weights`` (Hs*Ws,)."""
        return maps.weighted_sum(index, alignment.splat(cell_weights))[None]

    def _boxes_in_cells(self, sample: Any, hw: Sequence[int], device: torch.device) -> Tensor:
        """GT boxes as axis-aligned [x1, y1, x2, y2] in student feature-cell coordinates."""
        if "bboxes_3d" not in sample.gt_instances_3d:
            return torch.zeros(0, 4, device=device)
        corners = sample.gt_instances_3d.bboxes_3d.corners[..., :2].to(device)  # (N, 8, 2)
        x_min, y_min, x_max, y_max = self.student_range
        scale = torch.tensor([hw[1] / (x_max - x_min), hw[0] / (y_max - y_min)], device=device)
        cells = (corners - torch.tensor([x_min, y_min], device=device)) * scale
        return torch.cat([cells.min(dim=1).values, cells.max(dim=1).values], dim=1)

    def loss(self, inputs: dict, data_samples: list) -> dict[str, Tensor]:
        recorder = LayerRecorder(self.student, self.student_modules, detach=False)
        with recorder:
            losses = self.student.loss(inputs, data_samples)
        raw, unaugmented_frame = self._raw_targets(inputs, data_samples)
        for s_layer, t_layer in self.pairs.items():
            student = recorder.outputs[s_layer]
            alignments = self._alignments(raw[t_layer], tuple(student.shape[-2:]), data_samples, unaugmented_frame,
                                          student.device)
            key = head_key(s_layer)
            losses[f"loss_kd_{key}"] = self.alpha * self._distill(key, student, raw[t_layer], alignments, data_samples)
            valid_fraction = torch.stack([alignment.valid.float().mean() for alignment in alignments]).mean()
            losses[f"kd_valid_fraction_{key}"] = valid_fraction.detach()
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
