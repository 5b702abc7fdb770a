"""``featcache deploy``: export a CenterPoint-pillar detector for ONNX Runtime (torch + mmdet3d side).

The split is mmdeploy's for CenterPoint/PointPillars: hard voxelisation is pre-processing (numpy,
:mod:`featcache.deploy.voxelize`), the graph runs from the voxels to the head's dense maps, box decoding
and NMS are post-processing (numpy, :mod:`featcache.deploy.postprocess`). The PillarFeatureNet's
per-point augmentation (offsets to the pillar's point mean and to its centre, the padding mask) stays
*inside* the graph, as mmdeploy keeps it: the pre-processing is then mmcv's ``Voxelization`` and
nothing else, and the graph computes the modules of the checkpoint (``pts_voxel_encoder``,
``pts_middle_encoder``, ``pts_backbone``, ``pts_neck``, ``pts_bbox_head``), three of them through the
equivalents of :mod:`featcache.deploy.graph` that ONNX Runtime runs 2-3x faster. The self-check compares
the exported graph with the mmdet3d modules themselves (``PillarNetwork.heads``).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export-based, the exporter torch 2.13 supports),
opset :data:`OPSET`, one dynamic axis (the number of voxels), weights inside the file. mmdeploy 1.3.1
does not run on this stack as shipped: its ``torch2onnx`` calls ``torch.onnx.export`` with
``dynamic_axes`` and TorchScript-era rewriters, which torch 2.13's default exporter refuses ("Failed to
convert 'dynamic_axes' to 'dynamic_shapes'"); only with the deprecated TorchScript exporter forced does
it export, and its runtime side needs torch and mmdet3d anyway.

Every output is written under a ``.partial`` name and renamed; ``deploy.json`` comes last, so a
directory holding it is a finished export.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from featcache.deploy.errors import UnsupportedModelError
from featcache.deploy.runtime import DeployedDetector, sha256_of
from featcache.deploy.spec import (INPUT_NAMES, INT8_MODEL_FILE, MODEL_FILE, SPEC_FILE, DecoderSpec, DeploySpec,
                                   NmsSpec, OnnxSpec, PointsSpec, TaskSpec, VoxelSpec)
from featcache.deploy.voxelize import hard_voxelize
from featcache.errors import CheckpointError, ConfigError

OPSET = 18
EXPORTER = f"torch.onnx.export(dynamo=True) torch {torch.__version__}"
OWN_FILES = (MODEL_FILE, INT8_MODEL_FILE, SPEC_FILE)
PROBE_POINTS = 30000
# ORT vs PyTorch on the probe scan: fp32 graphs agree to ~1e-5; far above means a broken export
SELF_CHECK_TOLERANCE = 1e-3
logger = logging.getLogger("featcache.deploy")

_IDENTITY_TRANSFORMS = ("Pack3DDetInputs", "LoadAnnotations3D", "ObjectRangeFilter", "ObjectNameFilter",
                        "DefaultFormatBundle3D", "Collect3D")


@dataclass(frozen=True)
class DeployResult:
    directory: str
    spec: DeploySpec
    seconds: float


def check_out_directory(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``--out`` the export must not write: a file; an existing non-empty directory unless
    ``overwrite`` and it is a featcache export (holds ``deploy.json`` or ``model.onnx``), whose own files
    alone are then replaced. featcache never writes into a directory it did not create."""
    out = os.fspath(out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConfigError(f"deploy --out {out!r} exists and is not a directory")
    if not os.path.isdir(out):
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ConfigError(f"deploy --out {out!r}: directory {parent} does not exist")
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not overwrite:
        raise ConfigError(f"deploy --out {out!r} exists and is not empty ({', '.join(entries[:5])}"
                          f"{'...' if len(entries) > 5 else ''}); featcache replaces an export only when told to "
                          "(--overwrite), or choose a new directory")
    if not any(name in entries for name in (SPEC_FILE, MODEL_FILE)):
        raise ConfigError(f"deploy --out {out!r} is not a featcache export (no {SPEC_FILE} or {MODEL_FILE}; it holds "
                          f"{', '.join(entries[:5])}): --overwrite replaces only an export's own files")


def _type(module: Any) -> str:
    return type(module).__name__


def _unsupported(path: str, module: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"the detector's {path} ({_type(module)}) blocks the export: {why}. featcache deploy "
                                 "exports CenterPoint-style pillar detectors (hard Voxelization -> PillarFeatureNet "
                                 "-> PointPillarsScatter -> backbone/neck -> CenterHead with CenterPointBBoxCoder)")


def check_exportable(model: torch.nn.Module) -> None:
    """UnsupportedModelError naming the first module the split cannot carry."""
    from mmdet3d.models.dense_heads import CenterHead
    from mmdet3d.models.middle_encoders import PointPillarsScatter
    from mmdet3d.models.task_modules.coders import CenterPointBBoxCoder
    from mmdet3d.models.voxel_encoders import PillarFeatureNet

    head = getattr(model, "pts_bbox_head", None)
    if head is None:
        single = getattr(model, "bbox_head", None)
        if single is not None:
            raise _unsupported("bbox_head", single, f"{_type(model)} is a single-stage detector whose dense head "
                               "decodes anchors; only CenterHead's decoding is reproduced by the runtime")
        raise _unsupported("detector", model, "it has no pts_bbox_head")
    for name in ("img_backbone", "img_neck", "pts_fusion_layer", "img_rpn_head", "img_roi_head"):
        part = getattr(model, name, None)
        if part is not None:
            raise _unsupported(name, part, "camera branches and fusion are not part of the lidar export")
    preprocessor = getattr(model, "data_preprocessor", None)
    if not getattr(preprocessor, "voxel", False) or getattr(preprocessor, "voxel_type", "hard") != "hard":
        raise _unsupported("data_preprocessor", preprocessor, "the runtime reproduces hard voxelisation only "
                           "(voxel=True, voxel_type='hard'), not dynamic voxelisation")
    encoder = getattr(model, "pts_voxel_encoder", None)
    if type(encoder) is not PillarFeatureNet:
        raise _unsupported("pts_voxel_encoder", encoder, "the graph's input is hard pillars for a PillarFeatureNet")
    middle = getattr(model, "pts_middle_encoder", None)
    if type(middle) is not PointPillarsScatter:
        why = ("sparse 3D convolution (spconv) has no ONNX Runtime kernel" if "Sparse" in _type(middle)
               else "the graph scatters pillars into the BEV canvas with a PointPillarsScatter")
        raise _unsupported("pts_middle_encoder", middle, why)
    if not isinstance(head, CenterHead):
        raise _unsupported("pts_bbox_head", head, "the runtime decodes CenterHead outputs only")
    if not isinstance(head.bbox_coder, CenterPointBBoxCoder):
        raise _unsupported("pts_bbox_head.bbox_coder", head.bbox_coder, "the runtime decodes CenterPointBBoxCoder")
    nms_type = (head.test_cfg or {}).get("nms_type")
    if nms_type not in ("circle", "rotate"):
        raise _unsupported("pts_bbox_head.test_cfg", head, f"nms_type {nms_type!r} is neither 'circle' nor 'rotate'")


def _transforms(pipeline: Iterable[dict]) -> Iterable[dict]:
    for transform in pipeline or []:
        if transform.get("type") == "MultiScaleFlipAug3D":
            if transform.get("flip") or transform.get("pcd_horizontal_flip") or transform.get("pcd_vertical_flip"):
                raise UnsupportedModelError("test pipeline: MultiScaleFlipAug3D with flipping (test-time augmentation) "
                                            "is not reproduced by the runtime")
            for inner in transform.get("transforms", []):
                if inner.get("type") in ("GlobalRotScaleTrans", "RandomFlip3D"):
                    continue  # identity inside a non-flipping, single-scale MultiScaleFlipAug3D
                yield inner
        else:
            yield transform


def points_spec(cfg, in_channels: int) -> PointsSpec:
    """The scan layout from the config's test pipeline (LoadPointsFromFile, LoadPointsFromMultiSweeps,
    PointsRangeFilter); without a test pipeline, ``in_channels`` float32 columns, all used, no filter.
    A transform the runtime does not reproduce is UnsupportedModelError naming it."""
    loader = cfg.get("test_dataloader") or cfg.get("val_dataloader")
    dataset = (loader or {}).get("dataset") or {}
    while "dataset" in dataset and "pipeline" not in dataset:
        dataset = dataset["dataset"]
    pipeline = dataset.get("pipeline")
    if not pipeline:
        return PointsSpec(in_channels, tuple(range(in_channels)), None, 0)
    load_dim, use_dim, range_filter, sweeps = None, None, None, 0
    for transform in _transforms(pipeline):
        kind = transform.get("type")
        if kind == "LoadPointsFromFile":
            for flag in ("shift_height", "use_color", "norm_intensity", "norm_elongation"):
                if transform.get(flag):
                    raise UnsupportedModelError(f"test pipeline: LoadPointsFromFile({flag}=True) is not reproduced by "
                                                "the runtime")
            load_dim = int(transform.get("load_dim", 6))
            dims = transform.get("use_dim", [0, 1, 2])
            use_dim = tuple(range(dims)) if isinstance(dims, int) else tuple(int(d) for d in dims)
        elif kind == "LoadPointsFromMultiSweeps":
            sweeps = int(transform.get("sweeps_num", 10))
        elif kind == "PointsRangeFilter":
            range_filter = tuple(float(v) for v in transform["point_cloud_range"])
        elif kind not in _IDENTITY_TRANSFORMS:
            raise UnsupportedModelError(f"test pipeline: transform {kind!r} changes the points in a way the runtime "
                                        "does not reproduce")
    if load_dim is None or use_dim is None:
        raise UnsupportedModelError("test pipeline: no LoadPointsFromFile, so the scan layout is unknown")
    if sweeps:
        # the cloud after the sweeps are merged: LoadPointsFromMultiSweeps keeps its own use_dim columns
        use_dim = tuple(range(in_channels))
        load_dim = max(load_dim, in_channels)
    if len(use_dim) != in_channels:
        raise UnsupportedModelError(f"test pipeline keeps {len(use_dim)} point features (use_dim {list(use_dim)}), "
                                    f"the pts_voxel_encoder takes {in_channels}")
    return PointsSpec(load_dim, use_dim, range_filter, sweeps)


def describe(model: torch.nn.Module, cfg) -> tuple[PointsSpec, VoxelSpec, DecoderSpec, NmsSpec]:
    """The pre- and post-processing settings, read from the *built* modules (what PyTorch runs)."""
    layer = model.data_preprocessor.voxel_layer
    max_voxels = layer.max_voxels
    max_voxels = int(max_voxels[1] if isinstance(max_voxels, (list, tuple)) else max_voxels)
    voxel = VoxelSpec(tuple(float(v) for v in layer.voxel_size),  # type: ignore[arg-type]
                      tuple(float(v) for v in layer.point_cloud_range),  # type: ignore[arg-type]
                      int(layer.max_num_points), max_voxels)
    encoder = model.pts_voxel_encoder
    in_channels = encoder.pfn_layers[0].linear.in_features - 3 * (encoder._with_cluster_center
                                                                  + encoder._with_voxel_center) \
        - int(encoder._with_distance)
    head = model.pts_bbox_head
    coder, test_cfg = head.bbox_coder, dict(head.test_cfg)
    decoder = DecoderSpec(tuple(float(v) for v in coder.pc_range[:2]),  # type: ignore[arg-type]
                          tuple(float(v) for v in coder.voxel_size[:2]),  # type: ignore[arg-type]
                          int(coder.out_size_factor), int(coder.max_num),
                          None if coder.score_threshold is None else float(coder.score_threshold),
                          tuple(float(v) for v in (coder.post_center_range if coder.post_center_range is not None
                                                   else ())), int(coder.code_size), bool(head.norm_bbox))
    if not decoder.post_center_range:
        raise _unsupported("pts_bbox_head.bbox_coder", coder, "post_center_range is None (mmdet3d's decode raises too)")
    min_radius = test_cfg.get("min_radius") or []
    nms = NmsSpec(str(test_cfg["nms_type"]), float(test_cfg.get("score_threshold") or 0.0),
                  float(test_cfg.get("nms_thr") or 0.0), test_cfg.get("pre_max_size"), test_cfg.get("post_max_size"),
                  tuple(float(v) for v in min_radius), tuple(float(v) for v in test_cfg.get("post_center_limit_range")
                                                             or ()))
    return points_spec(cfg, in_channels), voxel, decoder, nms


class PillarNetwork(torch.nn.Module):
    """The exported graph: hard pillars (``voxels`` (N, M, C), ``num_points`` (N,), ``coors`` (N, 4) as
    ``(batch=0, z, y, x)``) -> the CenterHead's dense maps, flattened task by task in the head's key
    order. ``heads`` runs the checkpoint's own modules (``CenterPoint.extract_pts_feat`` +
    ``pts_bbox_head.forward``, batch 1): the reference. ``forward``, what is exported, runs the
    :mod:`featcache.deploy.graph` equivalents where they apply (``rewrite=True``): the same weights and
    arithmetic in ops ONNX Runtime runs faster."""

    def __init__(self, detector: torch.nn.Module, rewrite: bool = True) -> None:
        super().__init__()
        from featcache.deploy.graph import graph_modules

        self.voxel_encoder = detector.pts_voxel_encoder
        self.middle_encoder = detector.pts_middle_encoder
        self.backbone = detector.pts_backbone
        self.neck = getattr(detector, "pts_neck", None)
        self.head = detector.pts_bbox_head
        self.rewritten = torch.nn.ModuleDict(graph_modules(detector) if rewrite else {})

    def _bev(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)
        return self.neck(x) if self.neck is not None else x

    def heads(self, voxels: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> list[dict]:
        """The checkpoint's modules as mmdet3d runs them: per task, its dict of dense maps."""
        features = self.voxel_encoder(voxels, num_points, coors)
        x = self._bev(self.middle_encoder(features, coors, 1))
        return [task[0] for task in self.head(x)]

    def graph_heads(self, voxels: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> list[dict]:
        """What the exported graph computes: ``heads`` with the rewritten modules where they apply."""
        rewritten = self.rewritten
        if "voxel_encoder" in rewritten:
            features = rewritten["voxel_encoder"](voxels, num_points, coors)
        else:
            features = self.voxel_encoder(voxels, num_points, coors)
        if "middle_encoder" in rewritten:
            x = rewritten["middle_encoder"](features, coors)
        else:
            x = self.middle_encoder(features, coors, 1)
        x = self._bev(x)
        head = rewritten["head"] if "head" in rewritten else self.head
        return [task[0] for task in head(x)]

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(value for task in self.graph_heads(voxels, num_points, coors) for value in task.values())


def probe_points(points: PointsSpec, voxel: VoxelSpec, count: int = PROBE_POINTS, seed: int = 0) -> np.ndarray:
    """A seeded scan of ``count`` points spread over the voxel grid (features after xyz in [0, 1)): the
    export's example input and the self-check's scan."""
    rng = np.random.default_rng(seed)
    low, high = np.asarray(voxel.point_cloud_range[:3]), np.asarray(voxel.point_cloud_range[3:])
    xyz = rng.uniform(low, high, size=(count, 3))
    xyz[:, 2] = rng.uniform(low[2], low[2] + 0.6 * (high[2] - low[2]), size=count)
    rest = rng.uniform(0.0, 1.0, size=(count, points.num_features - 3))
    return np.concatenate([xyz, rest], axis=1).astype(np.float32)


def torch_inputs(points: np.ndarray, voxel: VoxelSpec) -> tuple[torch.Tensor, ...]:
    voxels = hard_voxelize(points, voxel)
    return tuple(torch.from_numpy(array) for array in (voxels.voxels, voxels.num_points, voxels.coors))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's chatter (onnxscript's INFO rewrite notes, torch.onnx's "torchvision is not installed",
    pytree deprecation warnings) off the console for the export only; errors still propagate."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _export_onnx(network: PillarNetwork, example: Sequence[torch.Tensor], path: str, max_voxels: int,
                 output_names: Sequence[str]) -> None:
    count = torch.export.Dim("voxels", min=1, max=max(max_voxels, 2))
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            network, tuple(example), dynamo=True, opset_version=OPSET, input_names=list(INPUT_NAMES),
            output_names=list(output_names), dynamic_shapes={"voxels": {0: count}, "num_points": {0: count}, "coors": {0: count}},
            external_data=False, verbose=False, report=False, optimize=True)
        program.save(path, external_data=False)


def load_detector(config: str | os.PathLike, checkpoint: str | os.PathLike, cfg_options: dict | None = None):
    """(cfg, model in eval mode) with the checkpoint's weights; a checkpoint whose tensors do not fit the
    config is a CheckpointError naming both files."""
    from featcache.teacher import models

    cfg = models.load_config(config, cfg_options)
    models.init_mmdet3d_scope()
    model = models.build_model(cfg)
    from featcache.teacher.checkpoint import load_weights

    try:
        load_weights(model, checkpoint)
    except CheckpointError as exc:  # load_weights names the checkpoint and the tensors; add the config
        raise CheckpointError(f"{exc} (config {os.fspath(config)!r})") from exc
    return cfg, model.eval()


def export_detector(config: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike,
                    overwrite: bool = False, cfg_options: dict | None = None,
                    quantize: str | None = None, calibration_scans: int | None = None) -> DeployResult:
    """Export ``config`` + ``checkpoint`` to ``out`` (see the module docstring); returns the written spec.

    The export checks itself: ONNX Runtime on the probe scan must match PyTorch within
    :data:`SELF_CHECK_TOLERANCE`; the measured difference goes to ``deploy.json`` (``check``)."""
    import time

    start = time.perf_counter()
    out = os.fspath(out)
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r}: only int8")
    check_out_directory(out, overwrite)
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint {os.fspath(checkpoint)!r} does not exist")
    cfg, model = load_detector(config, checkpoint, cfg_options)
    check_exportable(model)
    points, voxel, decoder, nms = describe(model, cfg)
    network = PillarNetwork(model).eval()
    example = torch_inputs(probe_points(points, voxel), voxel)
    with torch.no_grad():  # the reference is the checkpoint's own modules, not the rewritten graph
        heads = network.heads(*example)
        reference = tuple(value for task in heads for value in task.values())
    tasks = tuple(TaskSpec(tuple(names), tuple(task)) for names, task in zip(model.pts_bbox_head.class_names, heads))

    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    for name in OWN_FILES:  # --overwrite: the previous export's own files go first, the JSON first of all
        if os.path.lexists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    try:
        spec = _write_export(out, cfg, model, network, example, reference, tasks, points, voxel, decoder, nms,
                             os.fspath(config), os.fspath(checkpoint), cfg_options, quantize, calibration_scans)
    except BaseException:
        # no half export left behind: partial files go; a directory this call created goes if it is empty
        for name in os.listdir(out):
            if name.endswith((".partial", ".partial.onnx")) or name in OWN_FILES:
                os.remove(os.path.join(out, name))
        if created and not os.listdir(out):
            os.rmdir(out)
        raise
    return DeployResult(out, spec, time.perf_counter() - start)


def _write_export(out: str, cfg, model, network: PillarNetwork, example, reference, tasks, points: PointsSpec,
                  voxel: VoxelSpec, decoder: DecoderSpec, nms: NmsSpec, config: str, checkpoint: str,
                  cfg_options: dict | None, quantize: str | None, calibration_scans: int) -> DeploySpec:
    """model.onnx, its self-check, the int8 copy if asked, then deploy.json (last)."""
    model_path = os.path.join(out, MODEL_FILE)
    partial = model_path + ".partial"
    output_names = tuple(f"task{i}.{name}" for i, task in enumerate(tasks) for name in task.outputs)
    _export_onnx(network, example, partial, voxel.max_voxels, output_names)
    os.replace(partial, model_path)

    import mmcv
    import mmdet3d
    import onnx
    import onnxruntime

    config_text = getattr(cfg, "text", "") or ""
    source = {"config": config, "config_text_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
              "cfg_options": {key: repr(value) for key, value in (cfg_options or {}).items()},
              "checkpoint": checkpoint, "checkpoint_sha256": sha256_of(checkpoint),
              "detector": _type(model), "num_parameters": int(sum(p.numel() for p in model.parameters())),
              "versions": {"torch": torch.__version__, "mmcv": mmcv.__version__, "mmdet3d": mmdet3d.__version__,
                           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}}
    onnx_spec = OnnxSpec(MODEL_FILE, sha256_of(model_path), OPSET, EXPORTER, output_names)
    spec = DeploySpec(points, voxel, tasks, decoder, nms, onnx_spec, source, {})
    # self-check through the runtime's own path (without the JSON on disk yet)
    detector = DeployedDetector(out, spec, _session(model_path))
    outputs = detector.raw_outputs(hard_voxelize(probe_points(points, voxel), voxel))
    diff = max(float(np.abs(outputs[name] - value.numpy()).max()) for name, value in zip(spec.output_names, reference))
    if not diff <= SELF_CHECK_TOLERANCE:
        raise UnsupportedModelError(f"{model_path}: ONNX Runtime and PyTorch differ by {diff:.3g} (max abs) on the probe "
                                    f"scan, above {SELF_CHECK_TOLERANCE}: the exported graph does not compute the model")
    spec = replace(spec, check={"probe": f"{PROBE_POINTS} seeded uniform points", "max_abs_diff_fp32": diff})
    if quantize == "int8":
        from featcache.deploy.quantize import quantize_int8

        spec = quantize_int8(spec, out, cfg, calibration_scans)
    spec.write(out)
    return spec


def _session(path: str):
    import onnxruntime as ort

    from featcache.deploy.runtime import session_options

    return ort.InferenceSession(path, sess_options=session_options(None), providers=["CPUExecutionProvider"])


def network_outputs(model: torch.nn.Module, voxels, num_points, coors) -> dict[str, np.ndarray]:
    """PyTorch's dense head outputs for given pillars, by the graph's output names (for comparisons)."""
    network = PillarNetwork(model, rewrite=False).eval()  # the reference: the rewritten copies are not needed
    with torch.no_grad():
        heads = network.heads(*(torch.as_tensor(np.asarray(a)) for a in (voxels, num_points, coors)))
    return {f"task{i}.{name}": value.numpy() for i, task in enumerate(heads) for name, value in task.items()}


__all__ = ["export_detector", "check_out_directory", "check_exportable", "load_detector", "PillarNetwork",
           "network_outputs", "OPSET"]
