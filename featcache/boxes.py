"""The teacher's decoded predictions (boxes, scores, labels) as a per-sample record of the cache.

Label KD adds the teacher's confident boxes to a student's targets; SparseKD and UniDistill both
use them. ``featcache build --boxes`` runs the teacher's own test-time decoder and NMS (its
``test_step``) and stores, per sample, what mmdet3d's ``pred_instances_3d`` holds.

Storage (FORMAT.md): one float32 array ``boxes`` of shape (N, capacity, box_dim + 2), one chunk per
sample like every other array; a row holds the sample's boxes in the teacher's order (by score)
with columns [box fields..., score, label] and the rows past its count padded with label -1. The
count is the number of rows whose label is >= 0. A fixed capacity keeps one chunk per sample
(crash-safe writes by ownership, as for features); padding costs nothing after compression. Labels
index ``BoxesSpec.classes``; box fields are mmdet3d's LiDAR box layout (bottom centre).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from featcache.errors import CacheFormatError, ConfigError

logger = logging.getLogger("featcache.boxes")

#: mmdet3d's LiDARInstance3DBoxes columns (box_dim 7, or 9 with velocity)
LIDAR_BOX_FIELDS = ("x", "y", "z", "l", "w", "h", "yaw", "vx", "vy")
#: capacity when the teacher's test_cfg names no maximum (max_per_img / max_num)
DEFAULT_CAPACITY = 500
PAD_LABEL = -1


class TeacherBoxes(NamedTuple):
    """One sample's teacher predictions: ``bboxes`` (K, box_dim) float32 in the cache's LiDAR frame
    (the teacher's un-augmented scan), ``scores`` (K,) float32, ``labels`` (K,) int64 indices into the
    cache's ``BoxesSpec.classes``."""

    bboxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class BoxesSpec:
    """What the ``boxes`` record holds; stored in the manifest (``Manifest.boxes``)."""

    capacity: int
    fields: tuple[str, ...]  # the box columns, e.g. LIDAR_BOX_FIELDS
    classes: tuple[str, ...]  # label i is classes[i]
    box_type: str = "LiDARInstance3DBoxes"  # mmdet3d box class, origin (0.5, 0.5, 0): bottom centre
    decoder: dict[str, Any] = field(default_factory=dict)  # the teacher's test_cfg (for the record)

    @property
    def box_dim(self) -> int:
        return len(self.fields)

    @property
    def row_shape(self) -> tuple[int, int]:
        return (self.capacity, self.box_dim + 2)

    def identity(self) -> tuple[Any, ...]:
        return (self.capacity, list(self.fields), list(self.classes))

    def to_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "fields": list(self.fields), "classes": list(self.classes),
                "box_type": self.box_type, "decoder": self.decoder}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BoxesSpec":
        try:
            return cls(capacity=int(data["capacity"]), fields=tuple(data["fields"]), classes=tuple(data["classes"]),
                       box_type=data.get("box_type", "LiDARInstance3DBoxes"), decoder=dict(data.get("decoder", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheFormatError(f"damaged boxes entry in the manifest ({type(exc).__name__}: {exc}); rebuild "
                                   "with `featcache build --force`") from exc

    def pack(self, boxes: TeacherBoxes, key: str = "?") -> tuple[np.ndarray, int]:
        """The stored row (capacity, box_dim + 2) of one sample, and how many boxes past the capacity
        were left out (the lowest-scoring ones; the build warns naming the sample)."""
        count = len(boxes)
        if boxes.bboxes.shape != (count, self.box_dim):
            raise ConfigError(f"sample {key!r}: the teacher returned boxes of shape {boxes.bboxes.shape}, the cache "
                              f"stores {self.box_dim} fields per box ({', '.join(self.fields)})")
        order = np.argsort(-boxes.scores, kind="stable")[:self.capacity]
        row = np.zeros(self.row_shape, dtype=np.float32)
        row[:, -1] = PAD_LABEL
        kept = len(order)
        row[:kept, :self.box_dim] = boxes.bboxes[order]
        row[:kept, -2] = boxes.scores[order]
        row[:kept, -1] = boxes.labels[order]
        return row, count - kept

    def unpack(self, row: np.ndarray) -> TeacherBoxes:
        count = int((row[:, -1] >= 0).sum())
        return TeacherBoxes(bboxes=np.ascontiguousarray(row[:count, :self.box_dim]),
                            scores=np.ascontiguousarray(row[:count, -2]),
                            labels=row[:count, -1].astype(np.int64))


def capacity_of(cfg: Any) -> int:
    """The most boxes the teacher's decoder returns per sample: its test_cfg's ``max_per_img``, else the
    bbox coder's ``max_num``, else :data:`DEFAULT_CAPACITY`."""
    test_cfg = cfg.model.get("test_cfg") or {}
    test_cfg = test_cfg.get("pts", test_cfg)
    if test_cfg.get("max_per_img"):
        return int(test_cfg["max_per_img"])
    for head_name in ("pts_bbox_head", "bbox_head"):
        coder = (cfg.model.get(head_name) or {}).get("bbox_coder") or {}
        if coder.get("max_num"):
            return int(coder["max_num"])
    return DEFAULT_CAPACITY


def predictions(data_sample: Any) -> TeacherBoxes:
    """One mmdet3d prediction (``Det3DDataSample`` from ``test_step``) as numpy arrays."""
    instances = data_sample.pred_instances_3d
    bboxes = instances.bboxes_3d
    tensor = bboxes.tensor if hasattr(bboxes, "tensor") else bboxes
    return TeacherBoxes(bboxes=tensor.detach().float().cpu().numpy(),
                        scores=instances.scores_3d.detach().float().cpu().numpy(),
                        labels=instances.labels_3d.detach().cpu().numpy().astype(np.int64))


def spec_for(cfg: Any, classes: tuple[str, ...], box_dim: int, capacity: int | None = None) -> BoxesSpec:
    """The ``BoxesSpec`` of a teacher: box columns from its boxes' width, class names in label order."""
    if box_dim not in (7, 9):
        raise ConfigError(f"the teacher's boxes have {box_dim} columns; featcache stores mmdet3d LiDAR boxes "
                          "(7 columns, or 9 with velocity)")
    test_cfg = cfg.model.get("test_cfg") or {}
    import json

    decoder = json.loads(json.dumps(test_cfg.to_dict() if hasattr(test_cfg, "to_dict") else dict(test_cfg),
                                    default=str))
    return BoxesSpec(capacity=int(capacity or capacity_of(cfg)), fields=LIDAR_BOX_FIELDS[:box_dim],
                     classes=tuple(classes), decoder=decoder)
