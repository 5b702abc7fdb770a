"""Sample identity: which scan each dataset item is, under which key a cache holds it, and where its boxes are.

A sample's key (:func:`sample_key`: the info's ``token``, else its lidar file relative to the data root) is
what pairs cache rows with dataset items, whatever the order of the info list; the scan it reads
(:func:`sample_source`) is recorded beside it, so that a cache is refused for a dataset holding other scans
under the same keys (:func:`check_sources`). Light on purpose: it reads the dataset's info dicts and never
builds a model (``featcache.teacher.models`` builds configs, detectors and datasets).
"""
from __future__ import annotations

import copy
import os
from typing import Any, Sequence

from featcache.errors import ConfigError


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
                          "e.g. featcache.teacher.samples.sample_key(info, dataset.data_root))")
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
    """``sample_source`` of every item, in dataset order (what a cache records beside the keys)."""
    root = dataset_data_root(dataset)
    return [sample_source(dataset.get_data_info(index), root) for index in range(len(dataset))]


def annotated_centres(dataset) -> list["np.ndarray"]:
    """Per item, in dataset order, (N, 2) float64 BEV centres (x, y metres, the dataset's box frame) of
    every box annotated in it: every class the annotation file names, not only the dataset's classes, and
    those its annotation filter drops (nuScenes' boxes without lidar points, or without a valid flag),
    through the dataset's own ``parse_ann_info`` (its box frame conversion). Where regression head outputs
    are kept (``featcache.head_layers.centre_cells``): a student with other classes or another filter than the
    teacher finds its GT boxes among them. Items without annotations (``instances``) have none. Raises
    ConfigError when the dataset is not an mmdet3d one or an item's annotations do not parse."""
    import numpy as np

    if not hasattr(dataset, "parse_ann_info") or not hasattr(dataset, "label_mapping"):
        raise ConfigError(f"{type(dataset).__name__} is not an mmdet3d Det3DDataset (no parse_ann_info / "
                          "label_mapping): the box centres the regression outputs are kept at cannot be read; build "
                          "with --dense-head-outputs to keep every cell")
    every_class = copy.copy(dataset)  # its label mapping keeps every annotated class (-1 stays "don't care")
    every_class.label_mapping = {label: label for label in dataset.label_mapping}
    every_class.num_ins_per_cat = [0] * len(every_class.label_mapping)  # parse_ann_info counts into its own
    if hasattr(dataset, "_filter_with_mask"):  # NuScenesDataset's filter of boxes by points or valid flag
        every_class._filter_with_mask = lambda annotations: annotations
    centres = []
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        try:
            annotations = every_class.parse_ann_info(info) if "instances" in info else None
        except Exception as exc:
            raise ConfigError(f"sample {index} ({_lidar_path(info)}): its annotations do not parse "
                              f"({type(exc).__name__}: {exc}); the regression outputs are kept at annotated box "
                              "centres, so build with --dense-head-outputs for data without them") from exc
        boxes = None if annotations is None else annotations.get("gt_bboxes_3d")
        if boxes is None or not len(boxes):
            centres.append(np.zeros((0, 2)))
        elif hasattr(boxes, "bev"):  # mmdet3d box structures: the BEV x, y of the box's own frame
            centres.append(boxes.bev[:, :2].double().numpy())
        else:
            centres.append(np.asarray(boxes, dtype=np.float64).reshape(len(boxes), -1)[:, :2])
    return centres


def dataset_keys(dataset) -> list[str]:
    """Sample keys of every item, in dataset order; duplicates are an error (keys must be unique)."""
    keys = item_keys(dataset)
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        duplicate = next(key for key in keys if key in seen or seen.add(key))
        raise ConfigError(f"sample key {duplicate!r} occurs more than once in the dataset; keys must be unique")
    return keys


def source_mismatches(cache_keys: Sequence[str], cache_sources: Sequence[str] | None, keys: Sequence[str],
                      sources: Sequence[str]) -> list[str]:
    """``key: cache has A, the dataset reads B`` for each key whose scan differs (keys not in the cache
    are left to the caller); nothing when the cache records no sources (written before it did)."""
    if cache_sources is None:
        return []
    recorded = dict(zip(cache_keys, cache_sources))
    return [f"{key!r}: the cache holds {recorded[key]}, the dataset reads {source}"
            for key, source in zip(keys, sources) if key in recorded and recorded[key] != source]


def source_prefix_difference(cache_keys: Sequence[str], cache_sources: Sequence[str] | None, keys: Sequence[str],
                             sources: Sequence[str]) -> str | None:
    """When every scan that differs under the same key is the same file under another leading directory
    (``n015...pcd.bin`` in the cache, ``samples/LIDAR_TOP/n015...pcd.bin`` read by the dataset): a sentence
    naming the two prefixes, which come from the datasets' ``data_prefix.pts`` (or the info files' paths).
    None when the scans differ otherwise, or nothing differs."""
    if cache_sources is None:
        return None
    recorded = dict(zip(cache_keys, cache_sources))
    prefixes = set()
    for key, source in zip(keys, sources):
        if key not in recorded or recorded[key] == source:
            continue
        held, read = recorded[key].split("/"), source.split("/")
        common = 0
        while common < min(len(held), len(read)) and held[-1 - common] == read[-1 - common]:
            common += 1
        if common == 0:  # another file name: not a prefix difference
            return None
        prefixes.add(("/".join(held[:len(held) - common]), "/".join(read[:len(read) - common])))
    if len(prefixes) != 1:
        return None
    (held, read), = prefixes

    def where(prefix: str) -> str:
        return f"under {prefix + '/'!r}" if prefix else "directly in the data root (no prefix)"

    return (f"the lidar paths differ only by their leading directory: the cache's files are {where(held)}, this "
            f"dataset's {where(read)}. That directory is the dataset's data_prefix.pts (or part of the info file's "
            f"lidar_path): read with the one the cache was built with, data_prefix.pts={held!r} (--cfg-options "
            f"train_dataloader.dataset.data_prefix.pts={held} for this repository's student configs; "
            f"train_dataloader.dataset.dataset.data_prefix.pts={held} for a CBGS-wrapped nuScenes config)")


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
        prefix = source_prefix_difference(cache.row_keys, cache.sources, keys, sources)
        advice = (f" {prefix[0].upper()}{prefix[1:]}." if prefix else
                  " Its targets would be another scan's: use the info file the cache was built from, or rebuild the "
                  "cache from this one")
        raise CacheMismatchError(
            f"{len(problems)} sample(s) of the dataset are other scans than the ones cache {cache.location} holds "
            f"under the same key, e.g. " + "; ".join(problems[:5]) + "." + advice)
    return sum(1 for key in keys if key in cache)


def check_covered(cache, keys: Sequence[str], what: str, missing_advice: str) -> None:
    """Refuse samples a cache lacks or holds incomplete: ``what`` names them (``"6 training samples of CONFIG"``,
    ``"--unlabelled INFOS: 3 scans"``: "N of" is put before it), ``missing_advice`` says how to build the missing
    ones. Raises CacheMismatchError naming the first few keys."""
    from featcache import format
    from featcache.errors import CacheMismatchError

    missing = [key for key in keys if key not in cache]
    if missing:
        raise CacheMismatchError(f"{len(missing)} of {what} are not in cache {cache.location} (dataset id "
                                 f"{cache.manifest.dataset_id[:12]}..., split {cache.manifest.split!r}), e.g. "
                                 f"{', '.join(map(repr, missing[:5]))}; {missing_advice}")
    status = cache.status()
    incomplete = [key for key in keys if status[cache.row_of(key)] != format.STATUS_COMPLETE]
    if incomplete:
        raise CacheMismatchError(f"{len(incomplete)} of {what} are not complete in {cache.location}, e.g. "
                                 f"{', '.join(map(repr, incomplete[:5]))}; finish it with `featcache build` (it "
                                 "resumes) or check `featcache verify`")
