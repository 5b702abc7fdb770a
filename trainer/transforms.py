"""Pipeline step that attaches a sample's cached teacher features (and boxes) to its packed data sample.

mmdet3d's ``Pack3DDetInputs`` refuses unknown result keys and ``Det3DDataPreprocessor`` keeps
only points/voxels/images, so cached targets travel on the data sample instead: this transform
packs as ``Pack3DDetInputs`` does, then reads the sample's stored features by key (in the
DataLoader worker: I/O, decompression and checksums run in parallel with training) and stores them
in ``data_sample.cached_targets`` with ``cache_row``/``cache_key`` in its metainfo. The float
conversion is left to ``CacheDistiller`` on the training device.

Teacher boxes (``featcache build --boxes``), when asked for, land in ``data_sample.teacher_instances_3d``,
apart from the GT and in the augmented frame: every mmdet3d augmentation (``GlobalRotScaleTrans``,
``RandomFlip3D``) moves only ``gt_bboxes_3d`` and records what it did, and its filters drop anything
riding beside the GT without re-indexing it, so the teacher boxes are moved here by the same box
methods (``rotate / scale / translate / flip``) with the recorded parameters in the recorded order
(``augment_boxes``), and range-filtered as ``ObjectRangeFilter`` filters GT boxes (``in_range_bev``).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from mmdet3d.datasets.transforms import ObjectSample, Pack3DDetInputs
from mmdet3d.registry import TRANSFORMS
from mmdet3d.structures import LiDARInstance3DBoxes
from mmengine.structures import BaseDataElement, InstanceData

from featcache import open_cache
from featcache.errors import CorruptSampleError, SampleNotCachedError
from featcache.teacher.samples import sample_key
from trainer.unlabelled import LABELLED

logger = logging.getLogger("trainer.transforms")
# Recorded augmentation the distiller needs to warp targets; Pack3DDetInputs' defaults miss some.
AUGMENTATION_META_KEYS = ("transformation_3d_flow", "pcd_rotation", "pcd_rotation_angle", "pcd_scale_factor",
                          "pcd_trans", "pcd_horizontal_flip", "pcd_vertical_flip", "pasted_boxes_bev")


def target_field(layer: str) -> str:
    """Data-element field name of a cached layer ('.' is not allowed in field names)."""
    return layer.replace(".", "__")


def qparams_field(layer: str) -> str:
    """Data-element field name of an int8 cached layer's per-channel scale/offset."""
    return target_field(layer) + "__qparams"


def augment_boxes(boxes: LiDARInstance3DBoxes, meta: dict[str, Any]) -> LiDARInstance3DBoxes:
    """Boxes of the cache frame (the un-augmented scan) moved into a sample's augmented frame by the
    box methods mmdet3d's augmentations call on ``gt_bboxes_3d``, with the parameters they recorded in
    ``meta`` (a pipeline's results or a data sample's metainfo), in ``transformation_3d_flow`` order:
    R -> ``rotate(pcd_rotation_angle)``, S -> ``scale(pcd_scale_factor)``, T -> ``translate(pcd_trans)``,
    HF / VF -> ``flip('horizontal' / 'vertical')``. Returns a moved copy."""
    boxes = boxes.clone()
    for step in meta.get("transformation_3d_flow", []):
        if step == "R":
            angle = meta.get("pcd_rotation_angle")
            if angle is None:  # only the matrix recorded: the angle of its transpose [[c, s], [-s, c]]
                rotation_t = torch.as_tensor(meta["pcd_rotation"], dtype=torch.float64)
                angle = float(torch.atan2(rotation_t[0, 1], rotation_t[0, 0]))
            boxes.rotate(float(angle))
        elif step == "S":
            boxes.scale(float(meta.get("pcd_scale_factor", 1.0)))
        elif step == "T":
            boxes.translate(np.asarray(meta.get("pcd_trans", [0.0, 0.0, 0.0]), dtype=np.float32))
        elif step == "HF":
            boxes.flip("horizontal")
        elif step == "VF":
            boxes.flip("vertical")
    return boxes


def teacher_instances(stored: Any, cache_classes: Sequence[str], classes: Sequence[str],
                      meta: dict[str, Any], point_cloud_range: Sequence[float] | None) -> InstanceData:
    """One sample's cached teacher predictions (``featcache.boxes.TeacherBoxes``, cache frame) as the
    student sees them: labels re-indexed into the student's ``classes`` by name (a class the student
    lacks is dropped), boxes that collide with a GT-pasted object (``meta['pasted_boxes_bev']``, cache
    frame; ObjectSample's own BEV collision test) dropped, since the pasted points replaced what the
    teacher saw there, the rest moved into the augmented frame (``augment_boxes``) and kept where
    their centre is inside ``point_cloud_range`` (``ObjectRangeFilter``'s rule)."""
    from mmdet3d.datasets.transforms.data_augment_utils import box_collision_test
    from mmdet3d.structures.ops import box_np_ops

    index = {name: label for label, name in enumerate(classes)}
    labels = np.array([index.get(cache_classes[label], -1) for label in stored.labels], dtype=np.int64)
    keep = labels >= 0
    pasted = meta.get("pasted_boxes_bev")
    if pasted is not None and len(pasted) and keep.any():
        bev = np.concatenate([stored.bboxes[:, [0, 1, 3, 4, 6]], np.asarray(pasted, dtype=np.float32)])
        corners = box_np_ops.center_to_corner_box2d(bev[:, :2], bev[:, 2:4], bev[:, 4])
        collides = box_collision_test(corners[:len(stored)], corners[len(stored):])
        keep &= ~collides.any(axis=1)
    boxes = LiDARInstance3DBoxes(torch.from_numpy(stored.bboxes[keep]).reshape(-1, stored.bboxes.shape[1]),
                                 box_dim=stored.bboxes.shape[1], origin=(0.5, 0.5, 0))
    boxes = augment_boxes(boxes, meta)
    scores, labels = torch.from_numpy(stored.scores[keep]), torch.from_numpy(labels[keep])
    if point_cloud_range is not None and len(boxes):
        inside = boxes.in_range_bev([point_cloud_range[i] for i in (0, 1, 3, 4)])
        boxes, scores, labels = boxes[inside], scores[inside], labels[inside]
    return InstanceData(bboxes_3d=boxes, scores_3d=scores, labels_3d=labels)


@TRANSFORMS.register_module()
class ObjectSampleRecorded(ObjectSample):
    """mmdet3d's GT-paste (``ObjectSample``) that also records where it pasted.

    The teacher never saw pasted objects, so their cells have no cached target. ObjectSample
    appends the pasted boxes after the scene's own; this keeps their BEV footprints
    ``pasted_boxes_bev`` (N, 5: x, y, l, w, yaw) in the frame of the un-augmented scene (GT paste
    runs before the global augmentations), which is the cache's frame. ``featcache train`` swaps
    it in for ``ObjectSample``.
    """

    def transform(self, input_dict: dict) -> dict:
        before = len(input_dict["gt_bboxes_3d"])
        output = super().transform(input_dict)
        pasted = output["gt_bboxes_3d"].tensor[before:]
        output["pasted_boxes_bev"] = pasted[:, [0, 1, 3, 4, 6]].numpy().astype("float32")
        return output


@TRANSFORMS.register_module()
class PackDetInputsWithCache(Pack3DDetInputs):
    """``Pack3DDetInputs`` plus the sample's cached features.

    Args:
        cache: cache location (directory, URL or .h5).
        layers: cached layers to load (default: all).
        skip_corrupt: when True, a corrupt or missing sample makes the pipeline return None, which
            mmengine's dataset answers by drawing another sample; every skip is logged and counted
            in ``skipped``. When False (default) the error stops training, naming the sample.
        storage_options: fsspec options for URL caches.
        data_root: the dataset's ``data_root``. A sample without a token (KITTI-style infos) is keyed
            by its lidar file relative to it (``featcache.teacher.samples.sample_key``), as the build keyed it.
        teacher_boxes: dict(classes=[the student's class names, in label order], point_cloud_range=[...])
            to attach the sample's cached teacher boxes (``teacher_instances``) as
            ``data_sample.teacher_instances_3d``; None (default): no boxes are read.
        labelled: False for the pipeline of unlabelled scans (``featcache train --unlabelled``): their samples
            carry ``labelled=False`` in their metainfo, and ``CacheDistiller`` keeps them out of the detection
            loss.
    """

    def __init__(self, cache: str, layers: Sequence[str] | None = None, skip_corrupt: bool = False,
                 storage_options: dict[str, Any] | None = None, data_root: str | None = None,
                 teacher_boxes: dict[str, Any] | None = None, labelled: bool = True, **pack_kwargs: Any) -> None:
        meta_keys = tuple(pack_kwargs.pop("meta_keys", Pack3DDetInputs.__init__.__defaults__[0]))
        super().__init__(meta_keys=tuple(dict.fromkeys(meta_keys + AUGMENTATION_META_KEYS)), **pack_kwargs)
        self.cache_location = cache
        self.cache = open_cache(cache, storage_options=storage_options)
        self.layers = list(layers) if layers else self.cache.layer_names
        self.skip_corrupt = skip_corrupt
        self.data_root = data_root
        self.teacher_boxes = dict(teacher_boxes) if teacher_boxes else None
        self.labelled = bool(labelled)
        self.skipped = 0

    def transform(self, results: dict) -> dict | None:
        key = sample_key(results, self.data_root)
        try:
            row = self.cache.row_of(key)
            features = self.cache.read_row_tensors(row, self.layers)
            stored_boxes = self.cache.read_boxes(row) if self.teacher_boxes else None
        except (CorruptSampleError, SampleNotCachedError) as exc:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            logger.warning("skipping sample %r (%d skipped in this worker): %s", key, self.skipped, exc)
            return None
        packed = super().transform(results)
        data_sample = packed["data_samples"]
        data_sample.set_metainfo({"cache_row": row, "cache_key": key, **({} if self.labelled else {LABELLED: False})})
        # stored values (float16, uint8 + scale/offset): CacheDistiller decodes them on the training device
        fields = {}
        for name, (values, qparams) in features.items():
            fields[target_field(name)] = values
            if qparams is not None:
                fields[qparams_field(name)] = qparams
        data_sample.cached_targets = BaseDataElement(**fields)
        if stored_boxes is not None:
            data_sample.teacher_instances_3d = teacher_instances(
                stored_boxes, self.cache.manifest.boxes.classes, self.teacher_boxes["classes"], results,
                self.teacher_boxes.get("point_cloud_range"))
        return packed
