"""Pipeline step that attaches a sample's cached teacher features to its packed data sample.

mmdet3d's ``Pack3DDetInputs`` refuses unknown result keys and ``Det3DDataPreprocessor`` keeps
only points/voxels/images, so cached targets travel on the data sample instead: this transform
packs as ``Pack3DDetInputs`` does, then reads the sample's stored features by key (in the
DataLoader worker: I/O, decompression and checksums run in parallel with training) and stores them
in ``data_sample.cached_targets`` with ``cache_row``/``cache_key`` in its metainfo. The float
conversion is left to ``CacheDistiller`` on the training device.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from mmdet3d.datasets.transforms import ObjectSample, Pack3DDetInputs
from mmdet3d.registry import TRANSFORMS
from mmengine.structures import BaseDataElement

from featcache import open_cache
from featcache.errors import CorruptSampleError, SampleNotCachedError
from featcache.models import sample_key

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
            by its lidar file relative to it (``featcache.models.sample_key``), as the build keyed it.
    """

    def __init__(self, cache: str, layers: Sequence[str] | None = None, skip_corrupt: bool = False,
                 storage_options: dict[str, Any] | None = None, data_root: str | None = None,
                 **pack_kwargs: Any) -> None:
        meta_keys = tuple(pack_kwargs.pop("meta_keys", Pack3DDetInputs.__init__.__defaults__[0]))
        super().__init__(meta_keys=tuple(dict.fromkeys(meta_keys + AUGMENTATION_META_KEYS)), **pack_kwargs)
        self.cache_location = cache
        self.cache = open_cache(cache, storage_options=storage_options)
        self.layers = list(layers) if layers else self.cache.layer_names
        self.skip_corrupt = skip_corrupt
        self.data_root = data_root
        self.skipped = 0

    def transform(self, results: dict) -> dict | None:
        key = sample_key(results, self.data_root)
        try:
            row = self.cache.row_of(key)
            features = self.cache.read_row_tensors(row, self.layers)
        except (CorruptSampleError, SampleNotCachedError) as exc:
            if not self.skip_corrupt:
                raise
            self.skipped += 1
            logger.warning("skipping sample %r (%d skipped in this worker): %s", key, self.skipped, exc)
            return None
        packed = super().transform(results)
        data_sample = packed["data_samples"]
        data_sample.set_metainfo({"cache_row": row, "cache_key": key})
        # stored values (float16, uint8 + scale/offset): CacheDistiller decodes them on the training device
        fields = {}
        for name, (values, qparams) in features.items():
            fields[target_field(name)] = values
            if qparams is not None:
                fields[qparams_field(name)] = qparams
        data_sample.cached_targets = BaseDataElement(**fields)
        return packed
