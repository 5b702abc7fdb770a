"""The thin mmdet3d integration layer: configs, detectors and datasets (sample identity: ``samples``).

Everything featcache knows about mmdet3d lives here, so the rest of the package deals in
``Config``, ``nn.Module`` and dataset objects only.
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from mmengine.config import Config

from featcache.teacher.checkpoint import load_weights
from featcache.errors import ConfigError
# --cfg-options, config paths and splits are options' (light, checked before any model work); sample identity
# (keys, scans, annotated centres) is featcache.teacher.samples'
from featcache.teacher.options import check_split, resolve_config_path

DATASET_WRAPPERS = ("CBGSDataset", "RepeatDataset", "ClassBalancedDataset", "ConcatDataset")
# what the wrappers take (mmengine/mmdet3d 1.4 signatures): any other key set on a wrapper is not the dataset's
WRAPPER_ARGS = ("type", "dataset", "datasets", "times", "oversample_thr", "lazy_init", "ignore_keys")
# the lidar branch's BEV modules: MVX-style detectors (CenterPoint, BEVFusion, MVXNet) and single-stage ones
# (VoxelNet, DynamicVoxelNet: mmdet3d's KITTI PointPillars, SECOND)
MVX_LAYERS = ("pts_middle_encoder", "pts_backbone", "pts_neck")
SINGLE_STAGE_LAYERS = ("middle_encoder", "backbone", "neck")
LAYER_CONVENTIONS = (f"MVX-style detectors (CenterPoint, BEVFusion): {','.join(MVX_LAYERS)}; single-stage ones "
                     f"(VoxelNet: PointPillars, SECOND): {','.join(SINGLE_STAGE_LAYERS)}")
logger = logging.getLogger("featcache.teacher.models")


def _error_chain(exc: BaseException) -> str:
    """``Type: message`` of an exception and of each exception it was raised from or during."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- caused by ".join(parts)


def custom_import_names(cfg) -> list[str]:
    """The module names of a config's ``custom_imports``."""
    spec = cfg.get("custom_imports") or {}
    imports = spec.get("imports", []) if hasattr(spec, "get") else []
    return [imports] if isinstance(imports, str) else [str(name) for name in imports]


def import_custom_modules(cfg, where: str) -> None:
    """Import a config's ``custom_imports`` (as mmengine does), keeping the real cause of a failure.

    mmengine replaces any ImportError with "Failed to import custom modules ... set PYTHONPATH", which
    is wrong when the module is found but fails inside (BEVFusion's ops not compiled: ``cannot import
    name 'bev_pool_ext'``). Here the message keeps the whole chain and says what to do."""
    spec = cfg.get("custom_imports") or {}
    allow_failed = bool(spec.get("allow_failed_imports", False)) if hasattr(spec, "get") else False
    for name in custom_import_names(cfg):
        try:
            importlib.import_module(name)
        except Exception as exc:
            if allow_failed:
                logger.warning("config %s: custom_imports module %r failed to import and is ignored "
                               "(allow_failed_imports=True): %s", where, name, _error_chain(exc))
                continue
            raise ConfigError(custom_import_message(where, name, exc)) from exc


def custom_import_message(where: str, name: str, exc: BaseException) -> str:
    top = name.split(".")[0]
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    message = f"config {where!r}: its custom_imports module {name!r} does not import: {_error_chain(exc)}. "
    if missing and (name == missing or name.startswith(missing + ".")):
        return message + (f"Python does not find {missing!r}: put the directory that contains {top}/ on PYTHONPATH "
                          f"(for projects.*: the mmdetection3d checkout's root; sys.path now starts "
                          f"{', '.join(sys.path[:4])})")
    if "BEVFusion" in name:
        return message + ("The module is found but fails inside: BEVFusion's C++/CUDA ops (bev_pool, voxelization) "
                          "are not built or not importable. Build them as mmdet3d's projects/BEVFusion/README.md "
                          "says (in the checkout: `python projects/BEVFusion/setup.py develop`, with a CUDA "
                          "toolkit matching torch), then retry; see README.md, Distilling a BEVFusion teacher")
    return message + "The module is found but fails inside (the error above): fix it or what it imports, then retry"


def wrapped_override_problem(cfg, key: str) -> str | None:
    """Why ``--cfg-options key=...`` would not reach a dataset: a key set on a dataset wrapper (CBGS,
    Repeat, ClassBalanced, Concat) that the wrapper does not take, with the path that would; else None."""
    parts = key.split(".")
    node: Any = cfg._cfg_dict if isinstance(cfg, Config) else cfg
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        nxt = parts[depth + 1]
        if isinstance(node, dict) and node.get("type") in DATASET_WRAPPERS and nxt not in WRAPPER_ARGS:
            path, inner = ".".join(parts[:depth + 1]), node
            while isinstance(inner, dict) and inner.get("type") in DATASET_WRAPPERS:
                if "dataset" in inner:
                    path, inner = path + ".dataset", inner["dataset"]
                elif "datasets" in inner:
                    path, inner = path + ".datasets.<i>", None
                else:
                    break
            return (f"--cfg-options {key}: {'.'.join(parts[:depth + 1])} is a {node.get('type')} (a dataset wrapper), "
                    f"which takes no {nxt!r}, so the override would not reach the dataset it wraps; set it there: "
                    f"{path}.{'.'.join(parts[depth + 1:])}=...")
    return None


def load_config(path: str | os.PathLike, cfg_options: dict[str, Any] | None = None):
    """Load an mmengine config (with its ``custom_imports``) and apply overrides."""
    resolved = resolve_config_path(path)
    try:
        # no yapf: mmengine re-formats a config's text (1.5-3 s here) every time a Runner logs or
        # dumps it or a checkpoint or cache manifest stores it; unformatted text is still valid Python
        cfg = Config.fromfile(str(resolved), format_python_code=False, import_custom_modules=False)
        # mmengine 0.10.7's fromfile passes the flag only for lazy-import configs; set it for all
        cfg = Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename, env_variables=cfg.env_variables,
                     format_python_code=False)
    except Exception as exc:
        hint = ""
        if isinstance(exc, OSError) and ("_base_" in str(exc) or "projects" in Path(resolved).parts):
            hint = (" (a config's _base_ files must exist where it names them: a projects/BEVFusion config needs the "
                    "whole mmdetection3d checkout, configs/_base_ included)")
        raise ConfigError(f"config {os.fspath(path)!r} does not load: {_error_chain(exc)}{hint}") from exc
    import_custom_modules(cfg, os.fspath(path))
    if cfg_options:
        problems = [problem for problem in map(lambda key: wrapped_override_problem(cfg, key), cfg_options) if problem]
        if problems:
            raise ConfigError("; ".join(problems))
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as exc:  # e.g. a dict given for a section the config sets to None
            raise ConfigError(f"--cfg-options do not apply to config {os.fspath(path)!r}: {_error_chain(exc)}") from exc
    return cfg


SOURCE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")


def custom_module_sources(cfg) -> dict[str, Any]:
    """The source files of a config's ``custom_imports`` modules (imported already) and their sha256:
    ``{"modules": [...], "files": {path: sha256}}``, paths relative to the directory the top-level
    package is imported from (``projects/BEVFusion/bevfusion/ops/voxel/voxelize.py``). A package counts
    with every source file below it (Python and C/C++/CUDA); compiled extensions (.so) do not."""
    import hashlib

    names = custom_import_names(cfg)
    files: dict[str, str] = {}
    for name in names:
        module = sys.modules.get(name)
        if module is None:  # allow_failed_imports=True and it failed: nothing of it ran
            continue
        depth = len(name.split("."))
        paths = list(getattr(module, "__path__", None) or [])
        if paths:
            roots = [(Path(path), Path(path).parents[depth - 1]) for path in paths]
            candidates = [(file, root) for directory, root in roots for file in sorted(directory.rglob("*"))
                          if file.suffix in SOURCE_SUFFIXES and "__pycache__" not in file.parts and file.is_file()]
        elif getattr(module, "__file__", None):
            file = Path(module.__file__)
            candidates = [(file, file.parents[depth - 1])]
        else:
            candidates = []
        for file, root in candidates:
            files[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return {"modules": names, "files": dict(sorted(files.items()))}


def source_differences(recorded: dict[str, Any], current: dict[str, Any], count: int = 10) -> list[str]:
    """What changed between two ``custom_module_sources``: modules, then files changed, added, removed."""
    lines = []
    if list(recorded.get("modules", [])) != list(current.get("modules", [])):
        lines.append(f"custom_imports: cache has {recorded.get('modules')}, this build has {current.get('modules')}")
    have, now = recorded.get("files", {}), current.get("files", {})
    lines += [f"teacher source {path}: changed" for path in sorted(set(have) & set(now)) if have[path] != now[path]]
    lines += [f"teacher source {path}: new (not in the cache's teacher)" for path in sorted(set(now) - set(have))]
    lines += [f"teacher source {path}: gone (was in the cache's teacher)" for path in sorted(set(have) - set(now))]
    if len(lines) > count:
        lines = lines[:count] + [f"... {len(lines) - count} more differences"]
    return lines


def default_layers(model: torch.nn.Module) -> list[str]:
    """``--layers`` when none are given: the lidar branch's BEV modules under the detector's convention
    (``pts_*`` for MVX-style detectors, ``middle_encoder,backbone,neck`` for single-stage ones)."""
    children = dict(model.named_children())
    for convention in (MVX_LAYERS, SINGLE_STAGE_LAYERS):
        present = [name for name in convention if children.get(name) is not None]
        if present:
            return present
    raise ConfigError(f"{type(model).__name__} has none of the default layers ({LAYER_CONVENTIONS}); name the "
                      f"modules to record with --layers (top-level modules: {', '.join(sorted(children))})")


def init_mmdet3d_scope() -> None:
    from mmdet3d.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def build_model(cfg, checkpoint: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                trust_globals: Iterable[str] = ()) -> torch.nn.Module:
    """Build ``cfg.model`` with mmdet3d's registry; load ``checkpoint`` safely if given."""
    init_mmdet3d_scope()
    from mmdet3d.registry import MODELS

    if "model" not in cfg:
        raise ConfigError(f"config {cfg.filename!r} has no 'model' section")
    try:
        model = MODELS.build(copy.deepcopy(cfg.model))
    except Exception as exc:
        raise ConfigError(f"config {cfg.filename!r}: the model does not build: {type(exc).__name__}: {exc}") from exc
    if checkpoint is not None:
        load_weights(model, checkpoint, trust_globals=trust_globals)
    return model.to(device)


def init_weights(model: torch.nn.Module) -> None:
    """``model.init_weights()``, plus the classification prior mmengine's recursion misses.

    mmengine's recursive init only descends into children that have ``init_weights``, and a plain
    ``nn.ModuleList`` has none. mmdet3d 1.4's ``CenterHead.task_heads`` is one, so its
    ``SeparateHead.init_weights`` never runs: the heatmap bias stays near 0 (a 0.5 prior) instead
    of ``init_bias`` (-2.19, a 0.1 prior) and heatmap losses start in the hundreds. Only the prior
    is applied here: running the skipped ``init_weights`` would also Kaiming-initialise the final
    convolutions (fan_out of a 1-channel output), which measured worse (initial losses in the
    thousands) than PyTorch's default init they keep now.
    """
    if hasattr(model, "init_weights"):
        model.init_weights()
    for module in model.modules():
        prior = getattr(module, "init_bias", None)
        head = getattr(module, "heatmap", None)
        if isinstance(prior, float) and isinstance(head, torch.nn.Sequential) and head[-1].bias is not None:
            head[-1].bias.data.fill_(prior)


def unwrap_dataset_cfg(dataset_cfg):
    """The innermost dataset config below CBGS/Repeat/ClassBalanced wrappers."""
    while dataset_cfg.get("type") in DATASET_WRAPPERS and "dataset" in dataset_cfg:
        dataset_cfg = dataset_cfg["dataset"]
    return dataset_cfg


def dataset_cfg_for_split(cfg, split: str, pipeline: str = "test"):
    """The config of ``split``'s dataset (wrappers removed), with the test-mode pipeline when
    ``pipeline == 'test'`` (what a teacher is run on), or the split's own pipeline ('own')."""
    check_split(split)
    loader = cfg.get(f"{split}_dataloader")
    if not loader or "dataset" not in loader:
        raise ConfigError(f"config {cfg.filename!r} has no {split}_dataloader.dataset for --split {split}")
    dataset_cfg = copy.deepcopy(unwrap_dataset_cfg(loader["dataset"]))
    if pipeline == "test":
        test_loader = cfg.get("test_dataloader") or cfg.get("val_dataloader")
        if not test_loader:
            raise ConfigError(f"config {cfg.filename!r} has no test_dataloader to take the test pipeline from")
        dataset_cfg["pipeline"] = copy.deepcopy(unwrap_dataset_cfg(test_loader["dataset"])["pipeline"])
        dataset_cfg["test_mode"] = True
    return dataset_cfg


def build_dataset(dataset_cfg):
    """Build a dataset from its config with mmdet3d's registry."""
    init_mmdet3d_scope()
    from mmdet3d.registry import DATASETS

    try:
        return DATASETS.build(copy.deepcopy(dataset_cfg))
    except Exception as exc:
        empty = _empty_info_list(dataset_cfg)  # mmengine's own words: "need at least one array to concatenate"
        if empty is not None:
            raise ConfigError(f"dataset {dataset_cfg.get('type')!r}: its info file {empty} lists no samples (an "
                              "empty data_list); point ann_file at the info file of the split you mean") from exc
        raise ConfigError(f"dataset {dataset_cfg.get('type')!r} (ann_file={dataset_cfg.get('ann_file')!r}, "
                          f"data_root={dataset_cfg.get('data_root')!r}) does not build: "
                          f"{type(exc).__name__}: {exc}") from exc


def _empty_info_list(dataset_cfg) -> str | None:
    """The path of the dataset's info file (its ``ann_file``, through wrappers) when its ``data_list`` is empty,
    else None (asked after a build failed)."""
    while not dataset_cfg.get("ann_file") and hasattr(dataset_cfg.get("dataset"), "get"):  # wrappers (CBGS, Repeat)
        dataset_cfg = dataset_cfg["dataset"]
    ann_file = dataset_cfg.get("ann_file")
    if not ann_file:
        return None
    path = os.path.join(str(dataset_cfg.get("data_root") or ""), str(ann_file))
    try:
        from mmengine.fileio import load

        infos = load(path)
    except Exception:  # noqa: BLE001 - unreadable: the build's own error says more
        return None
    empty = isinstance(infos, dict) and isinstance(infos.get("data_list"), list) and not infos["data_list"]
    return path if empty else None
