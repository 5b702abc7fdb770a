"""``deploy.json``: what an exported model's pre- and post-processing need, and where it came from.

One frozen dataclass per concern (points, voxels, head outputs, box decoding, NMS, the ONNX file, the
source checkpoint and config), each with ``to_dict`` / ``from_dict``; ``from_dict`` checks every field
once, so the runtime can trust a :class:`DeploySpec` it holds. torch-free (numpy only inside
``VoxelSpec.grid_size``): the runtime reads it where torch and mmdet3d are not installed.

The JSON is written last by the export: a directory without it is an incomplete export.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from featcache.deploy.errors import ExportNotFoundError, StaleExportError

FORMAT_VERSION = 1
SPEC_FILE = "deploy.json"
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"
INPUT_NAMES = ("voxels", "num_points", "coors")
NMS_TYPES = ("circle", "rotate")


def _floats(value: Any, length: int | None, what: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length) or \
            not all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
        raise StaleExportError(f"{what}: expected {length or 'a list of'} numbers, found {value!r}")
    return tuple(float(item) for item in value)


def _int(value: Any, what: str, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
        raise StaleExportError(f"{what}: expected an integer{f' >= {minimum}' if minimum is not None else ''}, "
                               f"found {value!r}")
    return value


@dataclass(frozen=True)
class PointsSpec:
    """How a scan file becomes the points the voxeliser sees (the config's test pipeline).

    ``load_dim`` float32 values per point in a ``.bin`` file, of which the columns ``use_dim`` are kept
    (mmdet3d's ``LoadPointsFromFile``); ``range_filter`` is ``PointsRangeFilter``'s range (points strictly
    inside are kept) or None. ``sweeps`` > 0: the config aggregates that many past sweeps
    (``LoadPointsFromMultiSweeps``), which needs poses the runtime does not have; the caller then passes
    the aggregated cloud (``len(use_dim)`` columns, time lag last) as mmdeploy's runtime expects too.
    """

    load_dim: int
    use_dim: tuple[int, ...]
    range_filter: tuple[float, ...] | None
    sweeps: int = 0

    @property
    def num_features(self) -> int:
        return len(self.use_dim)

    def to_dict(self) -> dict[str, Any]:
        return {"load_dim": self.load_dim, "use_dim": list(self.use_dim),
                "range_filter": None if self.range_filter is None else list(self.range_filter), "sweeps": self.sweeps}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PointsSpec":
        load_dim = _int(data.get("load_dim"), "points.load_dim", 1)
        use_dim = tuple(_int(item, "points.use_dim[]", 0) for item in data.get("use_dim") or [])
        if not use_dim or max(use_dim) >= load_dim:
            raise StaleExportError(f"points.use_dim {list(use_dim)} must name columns below load_dim {load_dim}")
        rng = data.get("range_filter")
        return cls(load_dim, use_dim, None if rng is None else _floats(rng, 6, "points.range_filter"),
                   _int(data.get("sweeps", 0), "points.sweeps", 0))


@dataclass(frozen=True)
class VoxelSpec:
    """mmcv ``Voxelization`` (hard) as the model's data preprocessor runs it in eval mode: the test-time
    ``max_voxels`` (the second of a (train, test) pair)."""

    voxel_size: tuple[float, float, float]
    point_cloud_range: tuple[float, float, float, float, float, float]
    max_num_points: int
    max_voxels: int

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """(x, y, z) cells, as mmcv computes them: round((max - min) / size) in float32."""
        import numpy as np  # only here: the spec itself is json-only

        rng = np.asarray(self.point_cloud_range, dtype=np.float32)
        size = np.asarray(self.voxel_size, dtype=np.float32)
        return tuple(int(value) for value in np.round((rng[3:] - rng[:3]) / size))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_size": list(self.voxel_size), "point_cloud_range": list(self.point_cloud_range),
                "max_num_points": self.max_num_points, "max_voxels": self.max_voxels}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VoxelSpec":
        return cls(_floats(data.get("voxel_size"), 3, "voxel.voxel_size"),  # type: ignore[arg-type]
                   _floats(data.get("point_cloud_range"), 6, "voxel.point_cloud_range"),  # type: ignore[arg-type]
                   _int(data.get("max_num_points"), "voxel.max_num_points", 1),
                   _int(data.get("max_voxels"), "voxel.max_voxels", 1))


@dataclass(frozen=True)
class TaskSpec:
    """One CenterHead task: its classes and the names of its dense outputs in the graph, in order
    (``task<i>.<name>``: reg, height, dim, rot, vel (if any), heatmap)."""

    class_names: tuple[str, ...]
    outputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "outputs": list(self.outputs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskSpec":
        names, outputs = data.get("class_names"), data.get("outputs")
        if not names or not all(isinstance(name, str) for name in names):
            raise StaleExportError(f"head.tasks[].class_names: expected class names, found {names!r}")
        required = {"reg", "height", "dim", "rot", "heatmap"}
        if not isinstance(outputs, list) or not required <= set(outputs):
            raise StaleExportError(f"head.tasks[].outputs {outputs!r} lacks one of {sorted(required)}")
        return cls(tuple(names), tuple(outputs))


@dataclass(frozen=True)
class DecoderSpec:
    """CenterPointBBoxCoder's settings plus the head's: top-``max_num`` centres per task, ``score_threshold``
    (strict), centres kept inside ``post_center_range``; ``norm_bbox``: the dim maps are log sizes."""

    pc_range: tuple[float, float]
    voxel_size: tuple[float, float]
    out_size_factor: int
    max_num: int
    score_threshold: float | None
    post_center_range: tuple[float, ...]
    code_size: int
    norm_bbox: bool

    def to_dict(self) -> dict[str, Any]:
        return {"pc_range": list(self.pc_range), "voxel_size": list(self.voxel_size),
                "out_size_factor": self.out_size_factor, "max_num": self.max_num,
                "score_threshold": self.score_threshold, "post_center_range": list(self.post_center_range),
                "code_size": self.code_size, "norm_bbox": self.norm_bbox}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DecoderSpec":
        threshold = data.get("score_threshold")
        if threshold is not None and not isinstance(threshold, (int, float)):
            raise StaleExportError(f"decoder.score_threshold: expected a number or null, found {threshold!r}")
        code_size = _int(data.get("code_size"), "decoder.code_size", 7)
        if code_size not in (7, 9):
            raise StaleExportError(f"decoder.code_size {code_size}: CenterPoint boxes have 7 or 9 values")
        return cls(_floats(data.get("pc_range"), 2, "decoder.pc_range"),  # type: ignore[arg-type]
                   _floats(data.get("voxel_size"), 2, "decoder.voxel_size"),  # type: ignore[arg-type]
                   _int(data.get("out_size_factor"), "decoder.out_size_factor", 1),
                   _int(data.get("max_num"), "decoder.max_num", 1),
                   None if threshold is None else float(threshold),
                   _floats(data.get("post_center_range"), 6, "decoder.post_center_range"),
                   code_size, bool(data.get("norm_bbox", True)))


@dataclass(frozen=True)
class NmsSpec:
    """The head's ``test_cfg``: ``circle`` NMS (centre distance squared <= ``min_radius[task]``) or
    ``rotate`` (mmcv's rotated BEV IoU >= ``nms_thr`` after a ``score_threshold`` and the top
    ``pre_max_size``), at most ``post_max_size`` boxes per task, centres inside ``post_center_limit_range``."""

    type: str
    score_threshold: float
    nms_thr: float
    pre_max_size: int | None
    post_max_size: int | None
    min_radius: tuple[float, ...]
    post_center_limit_range: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "score_threshold": self.score_threshold, "nms_thr": self.nms_thr,
                "pre_max_size": self.pre_max_size, "post_max_size": self.post_max_size,
                "min_radius": list(self.min_radius), "post_center_limit_range": list(self.post_center_limit_range)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NmsSpec":
        kind = data.get("type")
        if kind not in NMS_TYPES:
            raise StaleExportError(f"nms.type {kind!r}: choose one of {', '.join(NMS_TYPES)}")
        limit = data.get("post_center_limit_range") or []
        return cls(kind, float(data.get("score_threshold") or 0.0), float(data.get("nms_thr") or 0.0),
                   None if data.get("pre_max_size") is None else _int(data["pre_max_size"], "nms.pre_max_size", 1),
                   None if data.get("post_max_size") is None else _int(data["post_max_size"], "nms.post_max_size", 1),
                   _floats(data.get("min_radius") or [], None, "nms.min_radius"),
                   _floats(limit, 6, "nms.post_center_limit_range") if limit else ())


@dataclass(frozen=True)
class OnnxSpec:
    """The graph file, its checksum (what ties it to this JSON), opset and exporter; ``int8`` is the
    statically quantised copy's file and checksum when one was built."""

    file: str
    sha256: str
    opset: int
    exporter: str
    output_names: tuple[str, ...]
    int8: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "opset": self.opset, "exporter": self.exporter,
                "input_names": list(INPUT_NAMES), "output_names": list(self.output_names), "int8": self.int8}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OnnxSpec":
        if list(data.get("input_names") or []) != list(INPUT_NAMES):
            raise StaleExportError(f"onnx.input_names {data.get('input_names')!r}: this runtime feeds {list(INPUT_NAMES)}")
        return cls(str(data.get("file") or MODEL_FILE), str(data.get("sha256") or ""),
                   _int(data.get("opset"), "onnx.opset", 1), str(data.get("exporter") or ""),
                   tuple(data.get("output_names") or ()), data.get("int8"))


@dataclass(frozen=True)
class DeploySpec:
    """Everything in ``deploy.json``. ``source`` records the config (path, sha256 of its text with its
    bases, the overrides), the checkpoint (path, sha256) and library versions; ``check`` the export's own
    PyTorch-vs-ONNX Runtime comparison on a probe scan."""

    points: PointsSpec
    voxel: VoxelSpec
    tasks: tuple[TaskSpec, ...]
    decoder: DecoderSpec
    nms: NmsSpec
    onnx: OnnxSpec
    source: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def class_names(self) -> tuple[str, ...]:
        """All classes in label order (task by task, as mmdet3d numbers them)."""
        return tuple(name for task in self.tasks for name in task.class_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"task{index}.{name}" for index, task in enumerate(self.tasks) for name in task.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "class_names": list(self.class_names),
                "points": self.points.to_dict(), "voxel": self.voxel.to_dict(),
                "tasks": [task.to_dict() for task in self.tasks], "decoder": self.decoder.to_dict(),
                "nms": self.nms.to_dict(), "onnx": self.onnx.to_dict(), "source": self.source, "check": self.check}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = SPEC_FILE) -> "DeploySpec":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StaleExportError(f"{where}: format_version {version!r}, this featcache reads {FORMAT_VERSION}: "
                                   "export the model again with this featcache (featcache deploy)")
        try:
            tasks = tuple(TaskSpec.from_dict(task) for task in data.get("tasks") or [])
            if not tasks:
                raise StaleExportError("tasks: none")
            spec = cls(PointsSpec.from_dict(data.get("points") or {}), VoxelSpec.from_dict(data.get("voxel") or {}),
                       tasks, DecoderSpec.from_dict(data.get("decoder") or {}), NmsSpec.from_dict(data.get("nms") or {}),
                       OnnxSpec.from_dict(data.get("onnx") or {}), dict(data.get("source") or {}),
                       dict(data.get("check") or {}))
        except StaleExportError as exc:
            raise StaleExportError(f"{where}: {exc}") from exc
        if spec.nms.type == "circle" and len(spec.nms.min_radius) != len(tasks):
            raise StaleExportError(f"{where}: nms.min_radius needs one radius per task ({len(tasks)})")
        if spec.onnx.output_names and tuple(spec.onnx.output_names) != spec.output_names:
            raise StaleExportError(f"{where}: onnx.output_names do not match the tasks' outputs")
        return spec

    def write(self, directory: str | os.PathLike) -> str:
        """Write ``deploy.json`` into ``directory`` (atomically: a partial file never has the final name)."""
        path = os.path.join(directory, SPEC_FILE)
        partial = path + ".partial"
        with open(partial, "w") as stream:
            json.dump(self.to_dict(), stream, indent=1)
            stream.write("\n")
        os.replace(partial, path)
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "DeploySpec":
        """Read and check ``directory/deploy.json``; ExportNotFoundError when the directory or the file
        is missing (an export that did not finish writes no JSON)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ExportNotFoundError(f"export directory {directory!r} does not exist (featcache deploy writes one)")
        path = os.path.join(directory, SPEC_FILE)
        if not os.path.isfile(path):
            raise ExportNotFoundError(f"{path} does not exist: {directory!r} is not a finished featcache export "
                                      "(the export writes deploy.json last); run featcache deploy again")
        try:
            with open(path) as stream:
                data = json.load(stream)
        except (OSError, json.JSONDecodeError) as exc:
            raise StaleExportError(f"{path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StaleExportError(f"{path} holds a {type(data).__name__}, not an object")
        return cls.from_dict(data, where=path)


def spec_to_json(spec: DeploySpec) -> str:
    """The JSON text of a spec (for tools that print it)."""
    return json.dumps(spec.to_dict(), indent=1)


__all__ = ["DeploySpec", "PointsSpec", "VoxelSpec", "TaskSpec", "DecoderSpec", "NmsSpec", "OnnxSpec",
           "FORMAT_VERSION", "SPEC_FILE", "MODEL_FILE", "INT8_MODEL_FILE", "INPUT_NAMES"]
