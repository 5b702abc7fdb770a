"""``featcache deploy --quantize int8``: static int8 quantisation of the exported graph (export side).

onnxruntime's ``quantize_static`` in QDQ format, int8 weights per output channel and uint8 activations
(U8S8, ONNX Runtime's fast x86 path: with int8 activations the slim demo student ran 0.9x of fp32, with
uint8 ones 1.6x faster, one thread),
calibrated (min-max) on the voxelised pillars of a few *training* scans of the config's train split
(spread evenly over it), never on the val scans the report scores.

Two parts stay float32 (:func:`float_nodes`):

- the pillar stage (everything before the first convolution: the PillarFeatureNet and the scatter). Its
  inputs are metric coordinates: uint8 over the +-50 m range would round points to ~0.4 m, coarser than a
  pillar; its reordered max pooling (:class:`featcache.deploy.graph.PillarFeatures`) pushes padding rows
  to -1e30, which would take a min-max range with it; and it is a few percent of the graph's time.
- the layers that make the graph's outputs (the head's final ConvTranspose layers): ONNX Runtime has no
  int8 ConvTranspose kernel on CPU, so quantising them only adds a weight dequantisation per run, and the
  dense maps keep full precision.

Measured on the demo's slim student (30 val scans, fp32 mAP 0.700; graph ms under the same load, fp32
23.9): with the pillar stage quantised too, the teacher's int8 heatmaps no longer resemble its fp32 ones
(correlation 0.23); pillar stage float, 0.666 mAP at 8 calibration scans and 0.702 at 32, 17.7 ms; the
output layers float as well, 0.701, 16.3 ms. The accuracy cost is what ``tools/deploy_report.py``
measures, not assumed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Iterator

import numpy as np

from featcache.deploy.runtime import sha256_of
from featcache.deploy.spec import INT8_MODEL_FILE, DeploySpec
from featcache.deploy.voxelize import hard_voxelize, prepare_points, read_scan
from featcache.errors import ConfigError

# Calibration scans by default. On the demo's slim student (30 val scans, mAP fp32 0.700; pillar stage
# float): 8 scans gave int8 0.666, 16 gave 0.698, 32 gave 0.702, 64 gave 0.692; the half student (fp32
# 0.795) 0.789 at 8 and 0.787 at 32.
CALIBRATION_SCANS = 32


def training_scans(cfg, count: int) -> list[str]:
    """``count`` lidar files of the config's train split, evenly spaced (ConfigError if it has none)."""
    from featcache.teacher import models

    dataset = models.build_dataset(models.dataset_cfg_for_split(cfg, "train"))
    if len(dataset) == 0:
        raise ConfigError(f"config {cfg.filename!r}: the train split is empty, nothing to calibrate int8 on")
    rows = np.unique(np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int))
    paths = []
    for row in rows:
        info = dataset.get_data_info(int(row))
        path = (info.get("lidar_points") or {}).get("lidar_path") or info.get("lidar_path")
        if not path or not os.path.isfile(path):
            raise ConfigError(f"train sample {row} of config {cfg.filename!r}: lidar file {path!r} not found "
                              "(set train_dataloader.dataset.data_root with --cfg-options)")
        paths.append(path)
    return paths


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over voxelised scans."""

    def __init__(self, spec: DeploySpec, paths: list[str]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            hard_voxelize(prepare_points(read_scan(path, spec.points), spec.points, where=path), spec.voxel).feeds()
            for path in paths)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def pillar_stage_nodes(model) -> list[str]:
    """Names of the nodes the first Conv's input depends on: the pillar encoder and the scatter."""
    producers = {output: node for node in model.graph.node for output in node.output}
    first_conv = next((node for node in model.graph.node if node.op_type == "Conv"), None)
    if first_conv is None:
        return []
    names, stack = set(), [first_conv.input[0]]
    while stack:
        node = producers.get(stack.pop())
        if node is None or node.name in names:
            continue
        names.add(node.name)
        stack.extend(node.input)
    return sorted(names)


def output_nodes(model) -> list[str]:
    """Names of the nodes that produce the graph's outputs (the head's final layers)."""
    outputs = {output.name for output in model.graph.output}
    return sorted(node.name for node in model.graph.node if outputs & set(node.output))


def float_nodes(model) -> list[str]:
    """The nodes the int8 model keeps in float32: :func:`pillar_stage_nodes` + :func:`output_nodes`."""
    return sorted(set(pillar_stage_nodes(model)) | set(output_nodes(model)))


def quantize_int8(spec: DeploySpec, directory: str, cfg, calibration_scans: int | None = None) -> DeploySpec:
    """Write ``directory/model.int8.onnx`` from ``model.onnx``; the spec gains its file, checksum and the
    calibration scans."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    paths = training_scans(cfg, CALIBRATION_SCANS if calibration_scans is None else calibration_scans)
    source = os.path.join(directory, spec.onnx.file)
    target = os.path.join(directory, INT8_MODEL_FILE)
    partial = target + ".partial.onnx"
    keep_float = float_nodes(onnx.load(source))
    root = logging.getLogger()  # quantize_static logs its "consider pre-processing" advice on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(source, partial, _Calibration(spec, paths), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float)
    finally:
        root.setLevel(level)
    os.replace(partial, target)
    int8 = {"file": INT8_MODEL_FILE, "sha256": sha256_of(target), "method": "onnxruntime quantize_static QDQ, "
            "int8 weights per channel + uint8 activations (U8S8), MinMax calibration; the pillar stage and "
            "the output layers float32",
            "calibration_scans": [os.path.basename(path) for path in paths]}
    return replace(spec, onnx=replace(spec.onnx, int8=int8))
