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
    # one reduction for the common case: NaN or inf anywhere makes the sum non-finite; so can an overflow of
    # finite values, hence the exact count before refusing
    if not np.isfinite(used[:, :3].sum()):
        bad = int((~np.isfinite(used[:, :3])).any(axis=1).sum())
        if bad:
            raise PointsError(f"{where}: {bad} points have non-finite coordinates")
    if spec.range_filter is not None:
        low, high = spec.range_filter[:3], spec.range_filter[3:]
        inside = np.ones(used.shape[0], dtype=bool)
        for axis in range(3):  # column by column: no (N, 3) temporaries
            column = used[:, axis]
            inside &= (column > np.float32(low[axis])) & (column < np.float32(high[axis]))
        used = used[inside]
        if used.shape[0] == 0:
            raise PointsError(f"{where}: none of its {array.shape[0]} points lies inside the model's point-cloud "
                              f"range {list(spec.range_filter)}")
    return used


def hard_voxelize(points: np.ndarray, spec: VoxelSpec, where: str = "points") -> Voxels:
    """Hard voxelisation of (N, C) float32 points, equal to mmcv's CPU ``Voxelization`` in eval mode.

    One stable sort of the points by cell groups each voxel's points in scan order (a radix sort when
    the grid has at most 2**16 cells, numpy's choice for 16-bit keys); a point's slot is its rank in its
    group, a voxel's number the rank of its first point."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    low = np.asarray(spec.point_cloud_range[:3], dtype=np.float32)
    size = np.asarray(spec.voxel_size, dtype=np.float32)
    gx, gy, gz = (int(v) for v in spec.grid_size)  # (x, y, z)
    # float32 throughout, as the kernel computes it; negative, out-of-range and non-finite cells are
    # >= 2**31 as uint32 and fail the one bound test per axis
    cells = np.floor((points[:, :3] - low) / size).astype(np.int32).view(np.uint32)
    cx, cy, cz = cells[:, 0], cells[:, 1], cells[:, 2]
    index = np.flatnonzero((cx < gx) & (cy < gy) & (cz < gz))
    if index.size == 0:
        raise PointsError(f"{where}: no point lies inside the voxel grid {list(spec.point_cloud_range)}")
    cell_count = gx * gy * gz
    dtype = np.int32 if cell_count < 1 << 31 else np.int64
    linear = (cz[index].astype(dtype) * gy + cy[index]) * gx + cx[index]
    key = linear.astype(np.uint16) if cell_count <= 1 << 16 else linear
    order = np.argsort(key, kind="stable")  # grouped by cell, scan order within a cell
    grouped = linear[order]
    starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))  # each cell's first position
    sizes = np.diff(np.append(starts, grouped.size))
    slot = np.arange(grouped.size) - np.repeat(starts, sizes)  # rank of each sorted point in its cell
    # voxel number = rank of the cell's first point in scan order (the sort is stable: order[start] is it)
    number = np.empty(starts.size, dtype=np.int64)
    number[np.argsort(order[starts])] = np.arange(starts.size)
    voxel = np.repeat(number, sizes)
    count = int(min(starts.size, spec.max_voxels))
    fits = np.flatnonzero((voxel < spec.max_voxels) & (slot < spec.max_num_points))
    voxels = np.zeros((count * spec.max_num_points, points.shape[1]), dtype=np.float32)
    voxels[voxel[fits] * spec.max_num_points + slot[fits]] = points[index[order[fits]]]
    kept = np.flatnonzero(number < spec.max_voxels)
    num_points = np.zeros(count, dtype=np.int32)
    num_points[number[kept]] = np.minimum(sizes[kept], spec.max_num_points)
    first = grouped[starts[kept]].astype(np.int64)  # linear cell of each kept voxel -> (z, y, x)
    coors = np.zeros((count, 4), dtype=np.int32)
    coors[number[kept], 1:] = np.stack([first // (gx * gy), (first // gx) % gy, first % gx], axis=1)
    return Voxels(voxels.reshape(count, spec.max_num_points, points.shape[1]), num_points, coors)
