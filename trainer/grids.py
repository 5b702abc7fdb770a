"""Where the student's and the teacher's BEV grids lie (``point_cloud_range`` extents) and how the teacher's
cached maps are laid out (the cache's record of each layer's ``BevLayout``)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from featcache import format
from featcache.format import bev_range
from featcache.errors import CacheMismatchError, ConfigError
from featcache.layout import CANONICAL


_RANGE_KEYS = ("point_cloud_range", "pc_range")


def _ranges_in(node: Any, path: str) -> dict[str, list[float]]:
    """Every ``point_cloud_range`` / ``pc_range`` entry under a config node, by dotted path."""
    found: dict[str, list[float]] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key in _RANGE_KEYS and isinstance(value, (list, tuple)) and all(
                    isinstance(v, (int, float)) for v in value):
                found[where] = [float(v) for v in value]
            else:
                found.update(_ranges_in(value, where))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            found.update(_ranges_in(value, f"{path}[{index}]"))
    return found


def student_bev_range(cfg, where: str) -> list[float]:
    """The student's BEV extent [x_min, y_min, x_max, y_max], from its model: the voxel layer's
    ``point_cloud_range`` (else the first 6-number range in the model). Every other range the model or the
    config's top-level ``point_cloud_range`` states (the voxel encoder's, the head's train/test and coder
    ``pc_range``) must agree with it: a student whose parts disagree is refused by name, since the trainer
    would place the teacher's targets on a grid the student does not have."""
    model = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    ranges = _ranges_in(model, "model")
    voxel = [path for path in ranges if path.endswith("voxel_layer.point_cloud_range") and len(ranges[path]) == 6]
    full = voxel or [path for path, value in ranges.items() if len(value) == 6]
    if not full:
        return bev_range(cfg.get("point_cloud_range", []), where)
    source = full[0]
    extent = bev_range(ranges[source], f"{where} ({source})")
    stated = dict(ranges)
    if cfg.get("point_cloud_range") is not None:
        stated["point_cloud_range (top level)"] = [float(v) for v in cfg.point_cloud_range]
    disagree = []
    for path, value in stated.items():
        mine = extent if len(value) != 2 else extent[:2]
        theirs = bev_range(value, path) if len(value) == 6 else value if len(value) in (2, 4) else None
        if theirs is not None and any(abs(a - b) > 1e-4 for a, b in zip(mine, theirs)):
            disagree.append(f"{path} = {value}")
    if disagree:
        raise ConfigError(f"{where}: the student's BEV grid is placed by {source} = {ranges[source]}, but "
                          f"{'; '.join(disagree)} disagree(s) with it; make them one range (a --cfg-options "
                          "override of point_cloud_range does not reach the model's copies: override those too)")
    return extent


def cache_point_cloud_range(manifest) -> list[float]:
    """The teacher's point_cloud_range as recorded by the build (or read from its config text)."""
    if manifest.extra.get("point_cloud_range"):
        return manifest.extra["point_cloud_range"]
    from mmengine.config import Config

    return list(Config.fromstring(manifest.teacher_config, ".py").get("point_cloud_range", []))


def cache_layouts(manifest, layers: Sequence[Any], where: str) -> dict[str, str]:
    """Each read layer's BEV layout name as the cache records it. A cache written before layouts were recorded
    is read as rows = y (as featcache always read it), except from a teacher whose maps are known to be laid
    out otherwise (BEVFusion's): that cache is refused."""
    if any(layer.layout_recorded for layer in manifest.layers):
        return {layer.name: layer.bev_layout.name for layer in layers}
    if "BEVFusion" in manifest.teacher_config:
        raise CacheMismatchError(
            f"cache {where} was built by a BEVFusion teacher before featcache recorded BEV layouts; BEVFusion lays "
            "its maps out rows = x, and this cache does not say which it holds. Rebuild it with this featcache "
            "(featcache build ... --force), which measures and records each layer's layout")
    logging.getLogger("trainer.train").warning(
        "cache %s records no BEV layout (built before featcache recorded them): its maps are read as rows = y, "
        "columns = x (mmdet3d's); rebuild it to have the layout measured and recorded", where)
    return {layer.name: CANONICAL.name for layer in layers}
