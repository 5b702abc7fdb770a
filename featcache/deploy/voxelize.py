"""Scan loading and hard voxelisation in numpy: the exported model's pre-processing.

:func:`hard_voxelize` reproduces mmcv 2.1's CPU ``Voxelization`` (``hard_voxelize_forward_cpu``)
exactly, vectorised: cell ``floor((p - range_min) / size)`` computed in float32 as the C++ kernel does;
points outside the grid dropped; voxels numbered in the order their first point appears; a voxel
beyond ``max_voxels`` dropped with all its points; each voxel keeps its first ``max_num_points``
points in scan order, the rest of its rows zero. It is deterministic (no hashing, no threads), and the
tests check it equal to mmcv's on real scans. Coordinates are ``(batch=0, z, y, x)`` int32, as the
model's data preprocessor pads them.

Only numpy is imported (the runtime's rule).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from featcache.deploy.errors import PointsError
from featcache.deploy.spec import PointsSpec, VoxelSpec


@dataclass(frozen=True)
class Voxels:
    """The ONNX graph's inputs: ``voxels`` (N, max_num_points, C) float32, ``num_points`` (N,) int32,
    ``coors`` (N, 4) int32 ``(batch, z, y, x)``."""

    voxels: np.ndarray
    num_points: np.ndarray
    coors: np.ndarray

    def feeds(self) -> dict[str, np.ndarray]:
        return {"voxels": self.voxels, "num_points": self.num_points, "coors": self.coors}


def read_scan(path: str | os.PathLike, spec: PointsSpec) -> np.ndarray:
    """A ``.bin`` scan (float32, ``spec.load_dim`` values per point) as the (N, len(use_dim)) float32 points
    the model sees. A file whose size is not a whole number of points fails naming the file and sizes."""
    path = os.fspath(path)
    try:
        raw = np.fromfile(path, dtype=np.float32)
    except OSError as exc:
        raise PointsError(f"scan {path!r} cannot be read: {exc}") from exc
    if raw.size % spec.load_dim:
        raise PointsError(f"scan {path!r} holds {raw.size} float32 values, not a whole number of points of "
                          f"{spec.load_dim} features each (the exported config's LoadPointsFromFile load_dim): "
                          "wrong file, or a scan of another sensor layout")
    return raw.reshape(-1, spec.load_dim)[:, list(spec.use_dim)]


def prepare_points(points: np.ndarray, spec: PointsSpec, where: str = "points") -> np.ndarray:
    """Check an (N, C) array against the export and return the float32 points the voxeliser takes.

    C may be ``spec.load_dim`` (a file's layout: the ``use_dim`` columns are kept) or ``len(use_dim)``
    (already the used features). Then ``PointsRangeFilter`` (strictly inside) when the config has one.
    Anything else, and a scan with no point left, is a PointsError naming ``where``."""
    array = np.asarray(points)
    if array.ndim != 2:
        raise PointsError(f"{where}: expected an (N, features) array of points, found shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise PointsError(f"{where}: points must be numbers, found dtype {array.dtype}")
    columns = array.shape[1]
    if columns == spec.num_features:
        used = array
    elif columns == spec.load_dim:
        used = array[:, list(spec.use_dim)]
    else:
        expected = sorted({spec.num_features, spec.load_dim})
        raise PointsError(f"{where}: points have {columns} features, the exported model takes "
                          f"{' or '.join(map(str, expected))} (load_dim {spec.load_dim}, use_dim {list(spec.use_dim)})")
    used = np.ascontiguousarray(used, dtype=np.float32)
    if used.shape[0] == 0:
        raise PointsError(f"{where}: the scan holds no points")
    if not np.isfinite(used[:, :3]).all():
        bad = int((~np.isfinite(used[:, :3])).any(axis=1).sum())
        raise PointsError(f"{where}: {bad} points have non-finite coordinates")
    if spec.range_filter is not None:
        rng = np.asarray(spec.range_filter, dtype=np.float32)
        inside = ((used[:, :3] > rng[:3]) & (used[:, :3] < rng[3:])).all(axis=1)
        used = used[inside]
        if used.shape[0] == 0:
            raise PointsError(f"{where}: none of its {array.shape[0]} points lies inside the model's point-cloud "
                              f"range {list(spec.range_filter)}")
    return used


def hard_voxelize(points: np.ndarray, spec: VoxelSpec, where: str = "points") -> Voxels:
    """Hard voxelisation of (N, C) float32 points, equal to mmcv's CPU ``Voxelization`` in eval mode."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    low = np.asarray(spec.point_cloud_range[:3], dtype=np.float32)
    size = np.asarray(spec.voxel_size, dtype=np.float32)
    grid = np.asarray(spec.grid_size, dtype=np.int64)  # (x, y, z)
    cells = np.floor((points[:, :3] - low) / size)  # float32 throughout, as the kernel computes it
    inside = ((cells >= 0) & (cells < grid)).all(axis=1)
    index = np.flatnonzero(inside)
    if index.size == 0:
        raise PointsError(f"{where}: no point lies inside the voxel grid {list(spec.point_cloud_range)}")
    cells = cells[index].astype(np.int64)
    linear = (cells[:, 2] * grid[1] + cells[:, 1]) * grid[0] + cells[:, 0]
    unique, first, inverse = np.unique(linear, return_index=True, return_inverse=True)
    # voxel number = rank of the voxel's first point in scan order
    by_appearance = np.argsort(first, kind="stable")
    number = np.empty_like(by_appearance)
    number[by_appearance] = np.arange(by_appearance.size)
    voxel_of_point = number[inverse.reshape(-1)]
    kept = voxel_of_point < spec.max_voxels
    index, voxel_of_point, cells = index[kept], voxel_of_point[kept], cells[kept]
    count = int(min(unique.size, spec.max_voxels))
    # slot of each point inside its voxel: its rank among the voxel's points, in scan order
    order = np.argsort(voxel_of_point, kind="stable")
    sorted_voxels = voxel_of_point[order]
    starts = np.searchsorted(sorted_voxels, np.arange(count))
    slot = np.empty_like(order)
    slot[order] = np.arange(order.size) - starts[sorted_voxels]
    fits = slot < spec.max_num_points
    voxels = np.zeros((count, spec.max_num_points, points.shape[1]), dtype=np.float32)
    voxels[voxel_of_point[fits], slot[fits]] = points[index[fits]]
    num_points = np.minimum(np.bincount(voxel_of_point, minlength=count), spec.max_num_points).astype(np.int32)
    coors = np.zeros((count, 4), dtype=np.int32)
    first_point = np.flatnonzero(slot == 0)
    coors[voxel_of_point[first_point], 1:] = cells[first_point][:, ::-1]  # (z, y, x)
    return Voxels(voxels, num_points, coors)
