"""The thin mmdet3d integration layer: configs, detectors, datasets and sample identity.

Everything featcache knows about mmdet3d lives here, so the rest of the package deals in
``Config``, ``nn.Module`` and dataset objects only.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from mmengine.config import Config

from featcache.checkpoint import load_weights
from featcache.errors import ConfigError

DATASET_WRAPPERS = ("CBGSDataset", "RepeatDataset", "ClassBalancedDataset", "ConcatDataset")
SPLITS = ("train", "val", "test")


def packaged_config_dir() -> Path:
    """Where mmdet3d ships its configs (``mmdet3d/.mim/configs``)."""
    import mmdet3d

    return Path(mmdet3d.__file__).parent / ".mim" / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file path; ``mmdet3d::centerpoint/x.py`` or a bare package-relative path names
    a config shipped inside mmdet3d."""
    text = os.fspath(path)
    candidate = Path(text)
    if candidate.is_file():
        return candidate
    relative = text.split("::", 1)[1] if text.startswith("mmdet3d::") else text
    packaged = packaged_config_dir() / relative
    if packaged.is_file():
        return packaged
    raise ConfigError(f"config {text!r} not found (looked at {candidate.resolve()} and {packaged})")


def parse_cfg_options(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings (mmengine's ``--cfg-options`` syntax) to a dict; values are parsed
    as Python literals where possible (``1``, ``[1,2]``, ``'a'``), else kept as strings."""
    from mmengine.config import DictAction

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cfg-options item {item!r} is not key=value")
        options[key] = DictAction._parse_iterable(value)
    return options


def load_config(path: str | os.PathLike, cfg_options: dict[str, Any] | None = None):
    """Load an mmengine config (with its ``custom_imports``) and apply overrides."""
    resolved = resolve_config_path(path)
    try:
        # no yapf: mmengine re-formats a config's text (1.5-3 s here) every time a Runner logs or
        # dumps it or a checkpoint or cache manifest stores it; unformatted text is still valid Python
        cfg = Config.fromfile(str(resolved), format_python_code=False)
        # mmengine 0.10.7's fromfile passes the flag only for lazy-import configs; set it for all
        cfg = Config(cfg.to_dict(), cfg_text=cfg.text, filename=cfg.filename, env_variables=cfg.env_variables,
                     format_python_code=False)
    except Exception as exc:
        raise ConfigError(f"config {os.fspath(path)!r} does not load: {type(exc).__name__}: {exc}") from exc
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


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
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
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
        raise ConfigError(f"dataset {dataset_cfg.get('type')!r} (ann_file={dataset_cfg.get('ann_file')!r}, "
                          f"data_root={dataset_cfg.get('data_root')!r}) does not build: "
                          f"{type(exc).__name__}: {exc}") from exc


def sample_key(data_info: dict[str, Any]) -> str:
    """A sample's stable identity: nuScenes ``token``, else ``sample_idx``, else its lidar file."""
    for field in ("token", "sample_idx"):
        if data_info.get(field) is not None:
            return str(data_info[field])
    lidar = data_info.get("lidar_points", {}).get("lidar_path") or data_info.get("lidar_path")
    if lidar:
        return os.path.basename(str(lidar))
    raise ConfigError(f"dataset item has no token, sample_idx or lidar path to key it by: keys {sorted(data_info)}")


def item_keys(dataset) -> list[str]:
    """Sample key of every item, in dataset order; wrappers (CBGS, Repeat) may repeat samples."""
    return [sample_key(dataset.get_data_info(index)) for index in range(len(dataset))]


def dataset_keys(dataset) -> list[str]:
    """Sample keys of every item, in dataset order; duplicates are an error (keys must be unique)."""
    keys = item_keys(dataset)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        duplicate = next(key for key in keys if key in seen or seen.add(key))
        raise ConfigError(f"sample key {duplicate!r} occurs more than once in the dataset; keys must be unique")
    return keys
