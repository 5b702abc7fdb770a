"""The thin mmdet3d integration layer: configs, detectors, datasets and sample identity.

Everything featcache knows about mmdet3d lives here, so the rest of the package deals in
``Config``, ``nn.Module`` and dataset objects only.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

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
    a config shipped inside mmdet3d (``featcache.options.resolve_config_path``)."""
    from featcache.options import resolve_config_path as resolve

    return resolve(path)


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


def _lidar_path(data_info: dict[str, Any]) -> str | None:
    lidar = (data_info.get("lidar_points") or {}).get("lidar_path") or data_info.get("lidar_path")
    return str(lidar) if lidar else None


def _relative_to(path: str, data_root: str | os.PathLike | None) -> str:
    """``path`` relative to ``data_root`` (posix separators), or normalised as is when it lies outside."""
    if data_root is None or not str(data_root):
        return path
    root = os.fspath(data_root)
    if "://" in path or "://" in root:  # URLs (mmengine file backends): a plain prefix
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path
    absolute, root = os.path.abspath(path), os.path.abspath(root)
    if absolute.startswith(root.rstrip(os.sep) + os.sep):
        return os.path.relpath(absolute, root).replace(os.sep, "/")
    return absolute


def sample_source(data_info: dict[str, Any], data_root: str | os.PathLike | None = None) -> str:
    """The scan a sample reads: its lidar file relative to ``data_root`` (the dataset's), so it stays
    the same when the dataset moves. The cache records it per row (``sources``)."""
    lidar = _lidar_path(data_info)
    if not lidar:
        raise ConfigError(f"dataset item has no lidar path (lidar_points.lidar_path) to name its scan by: keys "
                          f"{sorted(data_info)}")
    return _relative_to(lidar, data_root)


def sample_key(data_info: dict[str, Any], data_root: str | os.PathLike | None = None) -> str:
    """A sample's identity, the one place it is defined: the nuScenes-style ``token`` where the info has
    one, else its lidar file relative to the dataset's ``data_root`` (``sample_source``).

    Never ``sample_idx``: mmengine sets it to the item's position in the info list, so a reordered
    or filtered list would pair every sample with another scan's targets. An item without a token
    needs ``data_root`` (the path relative to it is what stays the same when the dataset moves)."""
    token = data_info.get("token")
    if token is not None and str(token):
        return str(token)
    if data_root is None:
        raise ConfigError("dataset item has no token, so its key is its lidar path relative to the data root, "
                          "and no data_root was given to take it relative to (pass the dataset's data_root, "
                          "e.g. models.sample_key(info, dataset.data_root))")
    return sample_source(data_info, data_root)


def dataset_data_root(dataset) -> str | None:
    """The ``data_root`` of a dataset, below CBGS/Repeat/ClassBalanced wrappers; a ConcatDataset's
    when all its parts share one (else None: keys then need tokens)."""
    while not hasattr(dataset, "data_root") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if hasattr(dataset, "data_root"):
        return dataset.data_root
    parts = getattr(dataset, "datasets", None)
    if parts:
        roots = {dataset_data_root(part) for part in parts}
        return roots.pop() if len(roots) == 1 else None
    return None


def item_keys(dataset) -> list[str]:
    """Sample key of every item, in dataset order; wrappers (CBGS, Repeat) may repeat samples."""
    root = dataset_data_root(dataset)
    return [sample_key(dataset.get_data_info(index), root) for index in range(len(dataset))]


def item_sources(dataset) -> list[str]:
    """``sample_source`` of every item, in dataset order."""
    root = dataset_data_root(dataset)
    return [sample_source(dataset.get_data_info(index), root) for index in range(len(dataset))]


def dataset_keys(dataset) -> list[str]:
    """Sample keys of every item, in dataset order; duplicates are an error (keys must be unique)."""
    keys = item_keys(dataset)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        duplicate = next(key for key in keys if key in seen or seen.add(key))
        raise ConfigError(f"sample key {duplicate!r} occurs more than once in the dataset; keys must be unique")
    return keys


def dataset_sources(dataset) -> list[str]:
    """``sample_source`` of every item, in dataset order (what a cache records beside the keys)."""
    return item_sources(dataset)


def source_mismatches(cache_keys: Sequence[str], cache_sources: Sequence[str] | None, keys: Sequence[str],
                      sources: Sequence[str]) -> list[str]:
    """``key: cache has A, the dataset reads B`` for each key whose scan differs (keys not in the cache
    are left to the caller); nothing when the cache records no sources (written before it did)."""
    if cache_sources is None:
        return []
    recorded = dict(zip(cache_keys, cache_sources))
    return [f"{key!r}: the cache holds {recorded[key]}, the dataset reads {source}"
            for key, source in zip(keys, sources) if key in recorded and recorded[key] != source]


def check_sources(cache, dataset) -> int:
    """Refuse a cache whose samples are other scans than ``dataset``'s under the same keys.

    For every dataset item whose key is in ``cache`` (a ``FeatureCache``), the lidar file the cache
    recorded for that key must be the one the dataset reads (both relative to their data roots, so
    a moved dataset matches). Raises CacheMismatchError naming the first mismatching keys. Keys the
    cache lacks are not checked here (a coverage check reports them). Returns the number of items
    checked: 0 when the cache records no sources (token-keyed caches written before featcache did).
    """
    from featcache.errors import CacheMismatchError

    if getattr(cache, "sources", None) is None:
        return 0
    root = dataset_data_root(dataset)
    infos = (dataset.get_data_info(index) for index in range(len(dataset)))
    keys, sources = zip(*((sample_key(info, root), sample_source(info, root)) for info in infos)) if len(dataset) else ((), ())
    problems = source_mismatches(cache.row_keys, cache.sources, keys, sources)
    if problems:
        raise CacheMismatchError(
            f"{len(problems)} sample(s) of the dataset are other scans than the ones cache {cache.location} holds "
            f"under the same key, e.g. " + "; ".join(problems[:5]) + ". Its targets would be another scan's: "
            "use the info file the cache was built from, or rebuild the cache from this one")
    return sum(1 for key in keys if key in cache)
