"""The deployed detector: numpy + onnxruntime only, no torch, mmcv or mmdet3d.

``DeployedDetector.open(DIR)`` reads ``DIR/deploy.json``, checks that ``DIR/model.onnx`` is the graph
the JSON was written for (its sha256), and opens an ONNX Runtime CPU session. ``predict`` takes a
``.bin`` scan path or an (N, C) array and returns :class:`~featcache.deploy.postprocess.Detections`
(boxes in the ``LiDARInstance3DBoxes`` tensor layout, scores, labels), the same as mmdet3d's
``pred_instances_3d`` for the checkpoint the export came from:

    scan -> points (use_dim, PointsRangeFilter) -> hard voxelisation (numpy) -> model.onnx
         -> box decoding + NMS (numpy)

``featcache predict DIR SCAN.bin [--out FILE]`` is this module's :func:`predict_command_output`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from featcache.deploy.errors import ExportNotFoundError, PointsError, StaleExportError
from featcache.deploy.postprocess import Detections, postprocess
from featcache.deploy.spec import DeploySpec
from featcache.deploy.voxelize import Voxels, hard_voxelize, prepare_points, read_scan
from featcache.format import sha256_file as sha256_of  # the one sha256 of a file; featcache.deploy names it so

MODEL_VARIANTS = ("fp32", "int8")


def session_options(threads: int | None):
    """ORT options for batch-1 CPU inference on ``threads`` intra-op threads (None: ORT's default);
    one inter-op thread, sequential execution: the graph is a chain."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


@dataclass
class DeployedDetector:
    """An export directory opened for inference. ``variant`` is ``fp32`` (model.onnx) or ``int8`` (the
    statically quantised copy, when the export built one)."""

    directory: str
    spec: DeploySpec
    session: Any
    variant: str = "fp32"

    @classmethod
    def open(cls, directory: str | os.PathLike, threads: int | None = None, variant: str = "fp32",
             check_checksum: bool = True) -> "DeployedDetector":
        """Open ``directory``. A missing directory or file is ExportNotFoundError; a ``model.onnx`` that is
        not the one ``deploy.json`` records (re-exported halfway, copied from elsewhere) StaleExportError."""
        directory = os.fspath(directory)
        spec = DeploySpec.read(directory)
        if variant not in MODEL_VARIANTS:
            raise StaleExportError(f"model variant {variant!r}: choose one of {', '.join(MODEL_VARIANTS)}")
        if variant == "int8":
            if not spec.onnx.int8:
                raise ExportNotFoundError(f"export {directory!r} has no int8 model (featcache deploy --quantize int8 "
                                          "builds one)")
            name, expected = spec.onnx.int8["file"], spec.onnx.int8["sha256"]
        else:
            name, expected = spec.onnx.file, spec.onnx.sha256
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise ExportNotFoundError(f"{path} does not exist, though {os.path.join(directory, 'deploy.json')} "
                                      "names it: the export directory is incomplete; run featcache deploy again")
        if check_checksum and sha256_of(path) != expected:
            raise StaleExportError(f"{path} is not the model {os.path.join(directory, 'deploy.json')} was written for "
                                   f"(sha256 differs from the recorded {expected[:12]}...): the directory mixes two "
                                   "exports; run featcache deploy again with --overwrite")
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(path, sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph...)
            raise StaleExportError(f"{path} does not load in ONNX Runtime {ort.__version__}: "
                                   f"{type(exc).__name__}: {exc}") from exc
        outputs = tuple(output.name for output in session.get_outputs())
        if outputs != spec.output_names:
            raise StaleExportError(f"{path}: graph outputs {list(outputs)[:4]}... are not the ones deploy.json lists")
        return cls(directory, spec, session, variant)

    def check_source(self, checkpoint: str | os.PathLike) -> None:
        """StaleExportError unless this export was made from ``checkpoint`` (its sha256, as deploy.json
        records it): an export left over from an earlier checkpoint of the same run is stale."""
        recorded = self.spec.source.get("checkpoint_sha256")
        actual = sha256_of(checkpoint)
        if recorded != actual:
            raise StaleExportError(f"export {self.directory!r} was made from checkpoint "
                                   f"{self.spec.source.get('checkpoint')!r} (sha256 {str(recorded)[:12]}...), not from "
                                   f"{os.fspath(checkpoint)!r} (sha256 {actual[:12]}...): export it again "
                                   "(featcache deploy --overwrite)")

    def points(self, scan: str | os.PathLike | np.ndarray) -> np.ndarray:
        """A scan path (``.bin``) or array as the checked, range-filtered float32 points the model takes."""
        if isinstance(scan, (str, os.PathLike)):
            path = os.fspath(scan)
            if not os.path.isfile(path):
                raise PointsError(f"scan {path!r} does not exist")
            return prepare_points(read_scan(path, self.spec.points), self.spec.points, where=f"scan {path!r}")
        return prepare_points(scan, self.spec.points)

    def voxelize(self, scan: str | os.PathLike | np.ndarray) -> Voxels:
        where = f"scan {os.fspath(scan)!r}" if isinstance(scan, (str, os.PathLike)) else "points"
        return hard_voxelize(self.points(scan), self.spec.voxel, where=where)

    def raw_outputs(self, voxels: Voxels) -> dict[str, np.ndarray]:
        """The graph's dense head outputs by name (``task<i>.<name>``, each (1, C, H, W))."""
        values = self.session.run(None, voxels.feeds())
        return dict(zip(self.spec.output_names, values))

    def postprocess(self, outputs: dict[str, np.ndarray]) -> Detections:
        return postprocess(outputs, self.spec.tasks, self.spec.decoder, self.spec.nms)

    def predict(self, scan: str | os.PathLike | np.ndarray) -> Detections:
        """Boxes, scores and labels of one scan (batch 1)."""
        return self.postprocess(self.raw_outputs(self.voxelize(scan)))


def detections_to_dict(detections: Detections, class_names: tuple[str, ...]) -> dict[str, Any]:
    """JSON-ready predictions: ``bboxes_3d`` rows (x, y, z_bottom, dx, dy, dz, yaw[, vx, vy]),
    ``scores_3d``, ``labels_3d`` and their class names, highest score first within each task."""
    return {"box_layout": ["x", "y", "z", "dx", "dy", "dz", "yaw", "vx", "vy"][:detections.boxes.shape[1]],
            "bboxes_3d": detections.boxes.tolist(), "scores_3d": detections.scores.tolist(),
            "labels_3d": detections.labels.tolist(),
            "classes": [class_names[label] for label in detections.labels.tolist()]}


def write_detections(detections: Detections, class_names: tuple[str, ...], out: str) -> str:
    """``.npz`` (arrays ``bboxes_3d``, ``scores_3d``, ``labels_3d``, ``class_names``) or ``.json``."""
    if out.lower().endswith(".npz"):
        np.savez(out, bboxes_3d=detections.boxes, scores_3d=detections.scores, labels_3d=detections.labels,
                 class_names=np.asarray(class_names))
    elif out.lower().endswith(".json"):
        with open(out, "w") as stream:
            json.dump(detections_to_dict(detections, class_names), stream)
    else:
        from featcache.errors import ConfigError

        raise ConfigError(f"--out {out!r}: name a .json or .npz file")
    return out
