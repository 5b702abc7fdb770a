"""The on-disk format of a feature cache (version 1), documented in FORMAT.md.

One Zarr v3 group::

    <cache>/featcache.json       creation marker, written before anything else (MARKER)
    <cache>/zarr.json            group; attributes["featcache"] = Manifest.to_dict()
    <cache>/keys                 (N,) str      sample identity (token, else lidar path), row order
    <cache>/sources              (N,) str      each sample's lidar file, relative to the data root
    <cache>/features/<layer>     (N, C, H, W)  stored values, chunk = 1 sample, no shards
    <cache>/qparams/<layer>      (N, 2, C)     int8 layers only: per-channel scale and offset
    <cache>/boxes                (N, M, D + 2) float32, --boxes only: the teacher's predictions
    <cache>/records              (N, 1 + L [+ 1]) uint32, chunk = 1 sample: [status, crc32c per layer
                                 [, crc32c of the boxes row]], each chunk ending with its own crc32c
    <cache>/featcache.lock       the writer lock (module ``featcache.lock``): one writer per cache; not data

A sample is complete when its ``records`` row says :data:`STATUS_COMPLETE`; the row is written
only after every feature chunk of the sample, so a crash can leave unrecorded chunks, never a
recorded sample with missing data. One chunk per sample means every sample is its own object in
every array: ranks write disjoint samples with no locks among them (the job holds the cache's writer
lock, ``featcache.lock``), and a reader touches only its sample.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Collection, Sequence

import numpy as np

from featcache.boxes import BoxesSpec
from featcache.codecs import CodecSpec
from featcache.errors import CacheFormatError
from featcache.layout import CANONICAL, BevLayout

FORMAT_NAME = "featcache"
FORMAT_VERSION = 1
KEYS_ARRAY = "keys"
SOURCES_ARRAY = "sources"
RECORDS_ARRAY = "records"
BOXES_ARRAY = "boxes"
FEATURES_GROUP = "features"
QPARAMS_GROUP = "qparams"
#: The creation marker: written before anything else of a new cache, it makes the location featcache's.
MARKER = "featcache.json"
#: Every entry featcache writes at a cache's root (the writer lock aside: ``location.LOCK``); nothing else is erased.
ENTRIES = (MARKER, "zarr.json", KEYS_ARRAY, SOURCES_ARRAY, RECORDS_ARRAY, BOXES_ARRAY, FEATURES_GROUP, QPARAMS_GROUP)

# What ``samples.sample_key`` returns; recorded in the manifest. Caches without it were written before
# keys were identities: token-keyed ones still read, position-keyed ones are refused.
KEY_SCHEME = "token, else lidar path relative to the data root"

STATUS_MISSING = 0
STATUS_COMPLETE = 1
STATUS_INVALID = 2  # teacher output was NaN/Inf: recorded so a resume does not retry forever
# Never written: what readers report for a records row that cannot be read (cut short, fails its chunk
# crc32c) or holds no status above (flipped bytes). Only that sample is damaged: ``verify`` names it,
# ``verify --repair`` and a resumed build rebuild it (``store.read_records``).
STATUS_DAMAGED = 3
RECORDED_STATUSES = (STATUS_MISSING, STATUS_COMPLETE, STATUS_INVALID)

# A layer whose non-zero fraction stays below this in every sample looked at is (nearly) all zeros:
# a teacher that produces nothing there (e.g. voxel coordinates in another order than the scatter
# expects gives a middle-encoder map 99.98% zeros). Real lidar BEV maps are far above it: the
# sparsest here, CenterPoint-pillar's scatter of the real nuScenes scan, is 1.6% non-zero (tests).
NEAR_ZERO_FRACTION = 1e-3
NONZERO_ATTRIBUTE = "featcache_nonzero"  # group attribute: per layer, non-zero fraction over the samples built


def layer_name(module: str, index: int | None = None) -> str:
    """A layer's name: its hooked module's, with ``.<index>`` for one item of a list/tuple output (``pts_neck.0``)."""
    return module if index is None else f"{module}.{index}"


def parse_layer_name(name: str, modules: Collection[str]) -> tuple[str, int | None] | None:
    """(module, index) of the layer ``name`` recorded from one of ``modules`` (:func:`layer_name` undone);
    None when it names none of them."""
    if name in modules:
        return name, None
    module, _, index = name.rpartition(".")
    return (module, int(index)) if module in modules and index.isdigit() else None


def bev_extent(point_cloud_range: Sequence[float] | None) -> list[float] | None:
    """[x_min, y_min, x_max, y_max] of a ``point_cloud_range`` (6 numbers; ``extra.point_cloud_range``): the
    metric extent of the teacher's BEV maps. None when it is not 6 numbers."""
    extent = list(point_cloud_range or [])
    return [float(extent[index]) for index in (0, 1, 3, 4)] if len(extent) == 6 else None


def bev_range(point_cloud_range: Sequence[float] | None, where: str, purpose: str = "to place its BEV grid") -> list[float]:
    """:func:`bev_extent`, or a ConfigError saying that ``where`` has no 6-number ``point_cloud_range`` and what it
    is needed for (``purpose``): the one rule from a config's range to a BEV extent, for teacher and student."""
    extent = bev_extent(point_cloud_range)
    if extent is None:
        from featcache.errors import ConfigError

        raise ConfigError(f"{where} has no point_cloud_range [x0, y0, z0, x1, y1, z1] (it has "
                          f"{list(point_cloud_range or []) or 'none'}) {purpose}")
    return extent


#: How the teacher boxes (``--boxes``) are stored: exact float32, zstd level 3 (``inspect`` reports it).
BOXES_CODEC = CodecSpec("fp32", "zstd", 3)


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array of a cache, as featcache lays it out: a row is one chunk (``chunks``), so every
    sample is its own object. The one statement of an array's path, row shape, dtype and codec: the writer
    creates it from this, the reader and the export read it by it, ``inspect`` sizes it."""

    path: str
    row_shape: tuple[int, ...]
    dtype: np.dtype
    # the values' codec (compressor, then zarr's chunk crc32c); None: stored raw, each chunk with its crc32c
    codec: CodecSpec | None = None

    @property
    def chunks(self) -> tuple[int, ...]:
        return (1, *self.row_shape)

    def shape(self, num_samples: int) -> tuple[int, ...]:
        return (num_samples, *self.row_shape)

    def zarr_codecs(self) -> dict[str, Any]:
        """Keyword arguments for ``zarr.create_array``: the codec's, else only a chunk crc32c (``codecs.checksummed``)."""
        from featcache import codecs

        return self.codec.zarr_codecs() if self.codec is not None else {"compressors": codecs.checksummed()}


@dataclass(frozen=True)
class LayerSpec:
    """One cached tensor: a hooked module's output (``index`` picks one of a list/tuple output)."""

    name: str
    module: str
    index: int | None
    shape: tuple[int, ...]
    codec: CodecSpec
    # a head output's description (``featcache.teacher.heads.HeadOutput.meaning``: kind, task, classes, what each
    # channel holds, logits or values); None for feature layers and for caches written before it
    meaning: dict[str, Any] | None = None
    # which array axis is x and which y (``featcache.layout``): {"rows": "+y", "cols": "+x", "found": "measured" |
    # "stated" | "assumed", "evidence": {layout: score}}; None: written before featcache recorded layouts
    layout: dict[str, Any] | None = None

    # derived once per spec (the reader asks them on every row, and tells the values array by identity)
    @cached_property
    def values_array(self) -> ArraySpec:
        """The array of the layer's stored values (``features/<layer>``)."""
        return ArraySpec(feature_path(self.name), self.shape, self.codec.storage_dtype, self.codec)

    @cached_property
    def qparams_array(self) -> ArraySpec | None:
        """The array of its per-channel (scale, offset) (``qparams/<layer>``) when its codec carries them
        (``CodecSpec.has_qparams``: int8), else None."""
        if not self.codec.has_qparams:
            return None
        return ArraySpec(qparams_path(self.name), (2, self.shape[0]), np.dtype(np.float32))

    def arrays(self) -> tuple[ArraySpec, ...]:
        """Every array holding a row of this layer: its values, then its scales and offsets if it has them.
        Its ``records`` checksum runs over them in this order (``checksum``)."""
        return (self.values_array,) if self.qparams_array is None else (self.values_array, self.qparams_array)

    @property
    def bev_layout(self) -> BevLayout:
        """The layer's BEV layout; a cache written before layouts were recorded is read in mmdet3d's (rows = y),
        as featcache always read it (``layout_recorded`` says which)."""
        return BevLayout.from_dict(self.layout) if self.layout is not None else CANONICAL

    @property
    def layout_recorded(self) -> bool:
        return self.layout is not None

    @property
    def is_head_output(self) -> bool:
        return self.meaning is not None

    @property
    def kind(self) -> str | None:
        """``"feature"`` for a hooked module's output, else the head output's kind (``"heatmap"``, ``"reg"``...)."""
        return self.meaning.get("kind") if self.meaning is not None else "feature"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "module": self.module, "index": self.index,
                "shape": list(self.shape), "codec": self.codec.to_dict(),
                **({"meaning": self.meaning} if self.meaning is not None else {}),
                **({"layout": self.layout} if self.layout is not None else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerSpec":
        return cls(name=data["name"], module=data["module"], index=data["index"],
                   shape=tuple(int(s) for s in data["shape"]), codec=CodecSpec.from_dict(data["codec"]),
                   meaning=data.get("meaning"), layout=data.get("layout"))


@dataclass(frozen=True)
class Manifest:
    """What a cache holds and what produced it; stored in the group's attributes.

    ``identity()`` is the part that must match for a build to resume: the teacher (model config
    and weights), the layers and codecs, the samples and the pipeline that fed the teacher. Paths
    (data_root, work dirs) are not part of it, so a moved dataset still matches.
    """

    layers: tuple[LayerSpec, ...]
    num_samples: int
    dataset_id: str
    teacher_config: str
    teacher_config_path: str
    teacher_model_sha256: str
    checkpoint_sha256: str
    pipeline: list[dict[str, Any]]
    split: str
    versions: dict[str, str]
    created: str
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    key_scheme: str | None = None  # KEY_SCHEME; None: written before keys were identities
    # the teacher's own code: {"modules": custom_imports, "files": {path: sha256}}; None: written before
    # featcache recorded it (such caches resume without the check)
    teacher_code: dict[str, Any] | None = None
    # the teacher's decoded predictions (build --boxes); None: the cache holds none
    boxes: BoxesSpec | None = None

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def records_width(self) -> int:
        """Columns of a ``records`` row: status, one checksum per layer, and the boxes' if held."""
        return 1 + len(self.layers) + (self.boxes is not None)

    @property
    def records_array(self) -> ArraySpec:
        """``records``: one row of status and checksums per sample, each chunk ending with its crc32c."""
        return ArraySpec(RECORDS_ARRAY, (self.records_width,), np.dtype(np.uint32))

    @property
    def boxes_array(self) -> ArraySpec | None:
        """``boxes``: the packed teacher boxes row of each sample (``BoxesSpec``); None when the cache holds none."""
        if self.boxes is None:
            return None
        return ArraySpec(BOXES_ARRAY, tuple(self.boxes.row_shape), np.dtype(np.float32), BOXES_CODEC)

    def arrays(self) -> tuple[ArraySpec, ...]:
        """Every per-sample array of the cache, in the order a new cache creates them: each layer's
        (``LayerSpec.arrays``), the boxes if held, the records last."""
        boxes = () if self.boxes_array is None else (self.boxes_array,)
        return (*(array for layer in self.layers for array in layer.arrays()), *boxes, self.records_array)

    @property
    def boxes_record_column(self) -> int:
        """The ``records`` column of the boxes row's checksum."""
        return 1 + len(self.layers)

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        from featcache.errors import UnknownLayerError

        raise UnknownLayerError(f"layer {name!r} is not in this cache; it holds {', '.join(self.layer_names)}")

    def identity(self) -> dict[str, Any]:
        return {
            "teacher_model_sha256": self.teacher_model_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "layers": [(layer.name, layer.codec.name) for layer in self.layers],
            "dataset_id": self.dataset_id,
            "num_samples": self.num_samples,
            "pipeline_sha256": sha256_text(json.dumps(self.pipeline, sort_keys=True, default=str)),
            "boxes": None if self.boxes is None else self.boxes.identity(),
            "regression_cells": self.regression_cells,
        }

    @property
    def unlabelled_samples(self) -> int:
        """How many of the cache's samples are scans nobody annotated (``featcache.teacher.unlabelled``): targets
        for a student's distillation terms only, never GT."""
        return int(self.extra.get("unlabelled_samples", 0))

    @property
    def regression_cells(self) -> dict[str, Any] | None:
        """Where the regression head outputs hold the teacher's values: ``{"at": "box centres", "margin",
        "teacher_boxes", "annotated_centres_sha256"}`` (``featcache.head_layers.centre_cells``: the cells of the
        sample's annotated boxes and, with ``teacher_boxes``, of its cached teacher boxes; 0 elsewhere), or
        None: every cell (``--dense-head-outputs``, caches without regression outputs, caches written
        before featcache kept them at centres)."""
        return self.extra.get("regression_cells")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "layers": [layer.to_dict() for layer in self.layers], "num_samples": self.num_samples,
            "dataset_id": self.dataset_id, "teacher_config": self.teacher_config,
            "teacher_config_path": self.teacher_config_path, "teacher_model_sha256": self.teacher_model_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "pipeline": self.pipeline, "split": self.split, "versions": self.versions,
            "created": self.created, "extra": self.extra,
            **({"key_scheme": self.key_scheme} if self.key_scheme is not None else {}),
            **({"teacher_code": self.teacher_code} if self.teacher_code is not None else {}),
            **({"boxes": self.boxes.to_dict()} if self.boxes is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "cache") -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{where}: no featcache manifest in the group attributes; "
                                   "is this a featcache cache? (rebuild it with `featcache build`)")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheFormatError(f"{where}: format version {version} is not supported by this featcache "
                                   f"(reads version {FORMAT_VERSION}); rebuild the cache or use a matching featcache")
        try:
            return cls(
                layers=tuple(LayerSpec.from_dict(layer) for layer in data["layers"]),
                num_samples=int(data["num_samples"]), dataset_id=data["dataset_id"],
                teacher_config=data["teacher_config"], teacher_config_path=data["teacher_config_path"],
                teacher_model_sha256=data["teacher_model_sha256"], checkpoint_sha256=data["checkpoint_sha256"], pipeline=data["pipeline"], split=data["split"],
                versions=data["versions"], created=data["created"], format_version=version,
                extra=data.get("extra", {}), key_scheme=data.get("key_scheme"),
                teacher_code=data.get("teacher_code"),
                boxes=BoxesSpec.from_dict(data["boxes"]) if data.get("boxes") is not None else None)
        except KeyError as exc:
            raise CacheFormatError(f"{where}: damaged manifest (required field {exc} is missing); restore zarr.json "
                                   "from a copy of the cache, or rebuild with `featcache build --force`") from exc
        except (TypeError, ValueError) as exc:
            raise CacheFormatError(f"{where}: damaged manifest ({type(exc).__name__}: {exc}); restore zarr.json "
                                   "from a copy of the cache, or rebuild with `featcache build --force`") from exc


def check_keys_are_identities(manifest: Manifest, keys: Sequence[str], where: str) -> None:
    """Refuse a cache written before keys were identities whose keys are list positions.

    Those caches keyed token-less samples by mmengine's ``sample_idx``, which is the position in the
    info list: a reordered or subset list would pair every row with another scan's targets.
    Token-keyed caches of that time keep working."""
    if manifest.key_scheme is not None or not keys:
        return
    if list(keys) == [str(row) for row in range(len(keys))]:
        raise CacheFormatError(
            f"{where}: its samples are keyed by their position in the info list ('0' to '{len(keys) - 1}'), as "
            "featcache did before keys named the scan; a reordered or filtered info list would pair rows with "
            f"other scans' targets, so it is not used. Rebuild it: `featcache build ... --out {where} --force` "
            "(keys become lidar paths relative to the data root)")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def library_versions() -> dict[str, str]:
    """The installed versions a manifest records (``Manifest.versions``; the reports' headers too): package
    metadata only, nothing imported; absent packages left out."""
    import importlib.metadata as metadata

    versions = {}
    for package in ("featcache", "torch", "mmdet3d", "mmdet", "mmengine", "mmcv", "spconv", "zarr", "numcodecs", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in blocks: the one digest of a file (checkpoints, teacher code,
    deploy exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_identity(keys: Sequence[str]) -> str:
    """Hash of the ordered sample keys: two datasets with the same samples in the same order match."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def checksum(*arrays: np.ndarray, start: int = 0) -> int:
    """crc32c over the stored values of one sample (and its int8 scales): catches flipped bytes
    and chunks that vanished (zarr reads a missing chunk as fill value without complaint).
    ``checksum(b, start=checksum(a)) == checksum(a, b)``, so parts can be summed where they are read."""
    import google_crc32c

    value = start
    for array in arrays:
        value = google_crc32c.extend(value, np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return int(value)


def feature_path(layer: str) -> str:
    return f"{FEATURES_GROUP}/{layer}"


def qparams_path(layer: str) -> str:
    return f"{QPARAMS_GROUP}/{layer}"
