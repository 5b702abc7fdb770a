"""Unlabelled scans as samples: info files of scans nobody annotated, for a teacher to cache targets on.

A lidar fleet records far more scans than anyone labels (nuScenes annotates one keyframe in ten: 2 Hz
keyframes, 20 Hz sweeps). A teacher cached once over the unlabelled ones turns them into training targets
(``featcache train --unlabelled``). This module writes mmdet3d v2 info files of such scans, so that
``featcache build`` and mmdet3d's datasets read them like any split:

* :func:`sweep_infos`: every keyframe's ``lidar_sweeps`` of an mmdet3d nuScenes info file as standalone
  samples, keyed by the sweep's ``sample_data_token`` (its identity in nuScenes), each with its own earlier
  sweeps (the later entries of the same keyframe's list, re-expressed in its frame) for multi-sweep input;
* :func:`scan_infos`: every ``.bin`` scan under a folder, keyed by its path (no token).

Each sample carries ``instances: []`` (mmdet3d datasets read it as a scan with no boxes) and
``unlabelled: True`` (:data:`UNLABELLED`): an empty labelled frame and a scan nobody labelled are not the
same thing, and the build records how many of its samples are unlabelled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featcache.errors import ConfigError, InputDataError

__all__ = ["UNLABELLED", "is_unlabelled", "SweepReport", "sweep_infos", "scan_infos", "load_infos", "write_infos"]

# The info field that marks a sample as a scan nobody annotated (teacher targets only).
UNLABELLED = "unlabelled"


def is_unlabelled(info: dict[str, Any]) -> bool:
    """Whether an info dict is a scan nobody annotated (written by this module), not a labelled frame."""
    return bool(info.get(UNLABELLED))


def load_infos(path: str | os.PathLike) -> dict[str, Any]:
    """An mmdet3d v2 info file (``metainfo`` and ``data_list``); ConfigError naming the file otherwise."""
    from mmengine.fileio import load

    try:
        infos = load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"info file {path}: cannot be read ({type(exc).__name__}: {exc}); give an mmdet3d v2 info "
                          "file (.pkl with metainfo and data_list)") from exc
    if not isinstance(infos, dict) or not isinstance(infos.get("data_list"), list):
        raise ConfigError(f"info file {path}: not an mmdet3d v2 info file (a dict with a data_list; this one holds "
                          f"{type(infos).__name__}{' with keys ' + str(sorted(infos)) if isinstance(infos, dict) else ''})"
                          "; convert it with mmdet3d's tools/dataset_converters/update_infos_to_v2.py")
    return infos


def write_infos(path: str | os.PathLike, data_list: list[dict[str, Any]], metainfo: dict[str, Any]) -> str:
    """Write ``data_list`` as an mmdet3d v2 info file at ``path`` (written whole to a temporary name first,
    so an interrupted write never leaves half a file under the name)."""
    from mmengine.fileio import dump

    path = os.fspath(path)
    if not path.endswith(".pkl"):
        raise ConfigError(f"{path}: an info file is written as pickle; give a path ending in .pkl")
    temporary = f"{path}.partial"
    dump({"metainfo": dict(metainfo), "data_list": data_list}, temporary, file_format="pkl")
    os.replace(temporary, path)
    return path


def _matrix(value: Any, what: str) -> np.ndarray:
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InputDataError(f"{what} is not a finite 4x4 matrix (shape {matrix.shape})")
    return matrix


def lidar_to_global(entry: dict[str, Any], what: str) -> np.ndarray:
    """(4, 4) float64: a sweep's (or keyframe's) lidar frame -> global, ``ego2global @ lidar2ego``."""
    lidar = entry.get("lidar_points") or {}
    if entry.get("ego2global") is None or lidar.get("lidar2ego") is None:
        raise InputDataError(f"{what} has no ego2global and lidar_points.lidar2ego, which place it in the world; "
                             "write the infos with mmdet3d 1.x's converters (update_infos_to_v2.py keeps them)")
    return _matrix(entry["ego2global"], f"{what}'s ego2global") @ _matrix(lidar["lidar2ego"], f"{what}'s lidar2ego")


def lidar2sensor(reference_to_global: np.ndarray, sweep_to_global: np.ndarray) -> list[list[float]]:
    """An earlier sweep's ``lidar_points.lidar2sensor`` relative to a reference scan, in mmdet3d's convention.

    mmdet3d's converter (``update_infos_to_v2.py``) stores, for the rotation R and translation t that take the
    sweep's points into the keyframe's lidar frame (``sensor2lidar``), ``[[R^T, -R^T t], [0, 1]]``, and
    ``LoadPointsFromMultiSweeps`` applies ``p @ M[:3, :3] - M[:3, 3]``. The same is written here for the sweep
    relative to ``reference`` (R, t from the two poses), so the reference's sweeps load exactly as a keyframe's
    do under the same mmdet3d (and a teacher trained with it sees what it saw in training)."""
    relative = np.linalg.inv(reference_to_global) @ sweep_to_global
    rotation, translation = relative[:3, :3], relative[:3, 3]
    stored = np.eye(4)
    stored[:3, :3] = rotation.T
    stored[:3, 3] = -rotation.T @ translation
    return stored.astype(np.float32).tolist()


@dataclass
class SweepReport:
    """What :func:`sweep_infos` wrote: samples, keyframes read, and how many samples have fewer earlier
    sweeps of their own than the keyframes do (the last sweeps of each keyframe's list)."""

    samples: int = 0
    keyframes: int = 0
    keyframes_without_sweeps: int = 0
    earlier_sweeps: dict[int, int] = field(default_factory=dict)  # earlier sweeps a sample has -> samples

    def summary(self) -> str:
        counts = ", ".join(f"{count} with {sweeps}" for sweeps, count in sorted(self.earlier_sweeps.items()))
        return (f"{self.samples} unlabelled sweeps from {self.keyframes} keyframes"
                + (f" ({self.keyframes_without_sweeps} keyframes list no sweeps)" if self.keyframes_without_sweeps else "")
                + (f"; earlier sweeps of their own for multi-sweep input: {counts}. A sweep's earlier sweeps are the "
                   "later entries of its keyframe's list; those before the previous keyframe are not linked (v2 infos "
                   "name no previous sample), so the oldest sweeps of each keyframe have fewer" if counts else ""))


def sweep_lidar_path(path: str, pts_prefix: str, sweeps_prefix: str) -> str:
    """A sweep's file as a sample's ``lidar_points.lidar_path``, which mmdet3d joins to ``data_prefix.pts``.

    mmdet3d's converter stores a sweep's path as nuScenes gave it (``./data/nuscenes/sweeps/LIDAR_TOP/...``)
    and its datasets read the file name below ``data_prefix.sweeps`` (``data_prefix.pts`` for a path naming
    ``samples``); the same file relative to the ``pts`` directory (``../../sweeps/LIDAR_TOP/...``)."""
    directory = pts_prefix if "samples" in path else sweeps_prefix
    return Path(os.path.relpath(os.path.join("/", directory, os.path.basename(path)), os.path.join("/", pts_prefix))
                ).as_posix()


def sweep_infos(infos: dict[str, Any], source: str = "the info file", max_earlier_sweeps: int | None = None,
                pts_prefix: str = "samples/LIDAR_TOP", sweeps_prefix: str = "sweeps/LIDAR_TOP"
                ) -> tuple[list[dict[str, Any]], SweepReport]:
    """Every keyframe's ``lidar_sweeps`` of mmdet3d nuScenes infos as standalone unlabelled samples.

    A sweep becomes a sample keyed by its ``sample_data_token``, at its own pose (``ego2global``,
    ``lidar_points.lidar2ego``) and time, with the keyframe's point format (``num_pts_feats``); its
    ``lidar_sweeps`` are the sweeps recorded before it in the same keyframe's list (nuScenes lists them newest
    first), each re-expressed relative to it (:func:`lidar2sensor`), at most ``max_earlier_sweeps``. Cameras are
    left out (lidar-only samples). Sweeps listed under two keyframes are written once. ``source`` names the
    file in errors; ``pts_prefix`` / ``sweeps_prefix`` are the dataset's ``data_prefix`` (nuScenes' by default),
    which place a sweep's own file (:func:`sweep_lidar_path`)."""
    data_list, report, seen = [], SweepReport(), set()
    for position, keyframe in enumerate(infos.get("data_list", [])):
        where = f"{source}, keyframe {keyframe.get('token', position)!r}"
        sweeps = keyframe.get("lidar_sweeps") or []
        report.keyframes += 1
        if not sweeps:
            report.keyframes_without_sweeps += 1
            continue
        num_pts_feats = (keyframe.get("lidar_points") or {}).get("num_pts_feats")
        poses = [lidar_to_global(sweep, f"{where}, sweep {index}") for index, sweep in enumerate(sweeps)]
        for index, sweep in enumerate(sweeps):
            token = sweep.get("sample_data_token")
            lidar = sweep.get("lidar_points") or {}
            if not token or not lidar.get("lidar_path"):
                raise InputDataError(f"{where}, sweep {index}: no sample_data_token or lidar_points.lidar_path to key "
                                     "and read it by; write the infos with mmdet3d 1.x's converters")
            if token in seen:
                continue
            seen.add(token)
            earlier = list(range(index + 1, len(sweeps)))[:max_earlier_sweeps]
            data_list.append({
                "sample_idx": len(data_list), "token": str(token), "timestamp": sweep.get("timestamp"),
                "ego2global": sweep["ego2global"],
                "lidar_points": {"lidar_path": sweep_lidar_path(str(lidar["lidar_path"]), pts_prefix, sweeps_prefix),
                                 "lidar2ego": lidar["lidar2ego"],
                                 **({"num_pts_feats": num_pts_feats} if num_pts_feats is not None else {})},
                "lidar_sweeps": [{"timestamp": sweeps[j].get("timestamp"), "ego2global": sweeps[j]["ego2global"],
                                  "sample_data_token": sweeps[j].get("sample_data_token"),
                                  "lidar_points": {"lidar_path": sweeps[j]["lidar_points"]["lidar_path"],
                                                   "lidar2ego": sweeps[j]["lidar_points"]["lidar2ego"],
                                                   "lidar2sensor": lidar2sensor(poses[index], poses[j])}}
                                 for j in earlier],
                "instances": [], UNLABELLED: True, "keyframe_token": keyframe.get("token"),
            })
            report.earlier_sweeps[len(earlier)] = report.earlier_sweeps.get(len(earlier), 0) + 1
    report.samples = len(data_list)
    if not data_list:
        raise ConfigError(f"{source}: none of its {report.keyframes} keyframes lists lidar_sweeps, so there are no "
                          "unlabelled sweeps to write; write the infos with sweeps (mmdet3d's nuScenes converter with "
                          "max_sweeps > 0), or give a folder of scans instead")
    return data_list, report


def scan_infos(folder: str | os.PathLike, num_pts_feats: int, relative_to: str | os.PathLike | None = None,
               pattern: str = "**/*.bin") -> list[dict[str, Any]]:
    """Every scan under ``folder`` matching ``pattern`` (sorted) as an unlabelled sample: ``lidar_path`` relative
    to ``relative_to`` (the directory the dataset's ``data_prefix.pts`` names, under its data root; default
    ``folder``), no token (the key is the scan's path relative to the data root), ``num_pts_feats`` values per
    point. No poses: single-scan input only."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--from-scans {folder}: not a directory")
    base = os.path.abspath(relative_to if relative_to is not None else folder)
    scans = sorted(path for path in root.glob(pattern) if path.is_file())
    if not scans:
        raise ConfigError(f"--from-scans {folder}: no file matches {pattern!r}")
    data_list = []
    for path in scans:
        size = path.stat().st_size
        if size == 0 or size % (4 * num_pts_feats):
            raise InputDataError(f"{path}: {size} bytes is not a whole number of points of {num_pts_feats} float32 "
                                 "values; give --num-pts-feats as the scans were written (nuScenes 5, KITTI 4)")
        data_list.append({"sample_idx": len(data_list),
                          "lidar_points": {"lidar_path": Path(os.path.relpath(os.path.abspath(path), base)).as_posix(),
                                           "num_pts_feats": num_pts_feats},
                          "instances": [], UNLABELLED: True})
    return data_list


def unlabelled_rows(data_infos: Sequence[dict[str, Any]]) -> list[int]:
    """Positions of the unlabelled samples (:func:`is_unlabelled`) among a dataset's info dicts."""
    return [row for row, info in enumerate(data_infos) if is_unlabelled(info)]
