"""Open a cache location (local directory or fsspec URL) as a Zarr v3 group.

Both go through the same call: zarr picks a LocalStore for paths and an FsspecStore for URLs
(``s3://bucket/cache``, ``memory://x``...), with ``storage_options`` passed to fsspec.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import zarr

from featcache.errors import CacheFormatError, CacheNotFoundError, ConfigError, FeatcacheError
from featcache.location import damaged_metadata as _damaged_metadata
from featcache.location import is_url  # noqa: F401  (featcache.store.is_url is used across the package)

# What zarr raises on a group zarr.json that is not valid metadata (garbage bytes, cut short, not
# an object); its own not-found errors are ValueErrors too, so those are caught first.
DAMAGED_METADATA_ERRORS = (ValueError, TypeError, AttributeError)


def _zarr_kwargs(location: str | os.PathLike, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"store": os.fspath(location), "zarr_format": 3}
    if is_url(location):
        kwargs["storage_options"] = storage_options or {}
    return kwargs


def exists(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """True when a featcache cache (a group with its manifest) is at ``location``. The manifest is
    written last when a cache is created, so a creation still under way (or interrupted) is not one
    yet. A damaged cache raises CacheFormatError: it is never taken for an absent one, which a build
    would create afresh over the recorded samples (see ``featcache.location``)."""
    from featcache import location as locations

    try:
        state = locations.inspect(location, storage_options)
    except ConfigError:  # a file: no cache there
        return False
    if state.kind == locations.DAMAGED:
        raise CacheFormatError(state.problem)
    return state.kind == locations.CACHE


def open_group(location: str | os.PathLike, mode: str = "r", storage_options: dict[str, Any] | None = None):
    """``mode``: 'r' read-only, 'r+' existing read-write, 'w' create (erasing what is there)."""
    try:
        return zarr.open_group(mode=mode, **_zarr_kwargs(location, storage_options))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        damage = _damage(location, storage_options)  # e.g. zarr.json deleted next to recorded samples
        if damage is not None:
            raise damage from exc
        raise CacheNotFoundError(f"no feature cache at {os.fspath(location)!r}; build one with "
                                 "`featcache build TEACHER_CONFIG CHECKPOINT --out ...`") from exc
    except PermissionError as exc:
        raise FeatcacheError(f"cannot open {os.fspath(location)!r} for {'writing' if mode != 'r' else 'reading'}: "
                             f"{exc}") from exc
    except (*DAMAGED_METADATA_ERRORS, KeyError) as exc:
        raise _metadata_problem(location, storage_options, exc) from exc


def _metadata_problem(location: str | os.PathLike, storage_options: dict[str, Any] | None,
                      exc: Exception) -> CacheFormatError:
    """The error for a group zarr.json zarr cannot read, in ``featcache.location``'s words when it can say
    more (e.g. a parsable zarr.json without a manifest, next to recorded samples)."""
    return _damage(location, storage_options) or _damaged_metadata(location, exc)


def _damage(location: str | os.PathLike, storage_options: dict[str, Any] | None) -> CacheFormatError | None:
    """``featcache.location``'s account of a damaged cache at ``location``, if that is what is there."""
    from featcache import location as locations

    try:
        state = locations.inspect(location, storage_options)
    except Exception:  # noqa: BLE001 - zarr's own error is the one to report then
        return None
    return CacheFormatError(state.problem) if state.kind == locations.DAMAGED else None


def array_problem(location: str, path: str, exc: BaseException) -> CacheFormatError:
    """The error for an array the manifest names that the cache cannot open: the manifest (zarr.json) was edited
    or damaged, or the array deleted; not a damaged sample that ``verify --repair`` could rebuild."""
    return CacheFormatError(f"{location}: the manifest names array {path!r}, which the cache cannot open "
                            f"({type(exc).__name__}: {exc}): zarr.json was edited or damaged, or the array was deleted. "
                            "Restore the cache from a copy, or rebuild it with `featcache build --force`")


def row_chunk_key(array: Any, row: int) -> str:
    """Store key, relative to the array, of the one chunk holding sample ``row`` (zarr Array or
    AsyncArray of a cache: one chunk per row)."""
    return array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))


def chunk_nbytes(array: zarr.Array, row: int) -> int | None:
    """Bytes one sample's chunk occupies in the store (after compression), if the store says."""
    from zarr.core.sync import sync

    key = row_chunk_key(array, row)
    try:
        return int(sync(array.store_path.store.getsize(f"{array.path}/{key}")))
    except Exception:
        return None


RECORDS_BLOCK = 1024  # rows read at once by ``read_records``; a block holding a damaged row is re-read row by row


def read_records(array: Any) -> tuple[np.ndarray, list[int]]:
    """Every row of a cache's ``records`` array (zarr or h5py), and the rows whose record is damaged: its
    chunk cannot be read (cut short, fails its crc32c) or its status is none of
    ``format.RECORDED_STATUSES`` (flipped bytes in a cache written before records chunks carried a crc32c).
    A damaged row reads as ``[format.STATUS_DAMAGED, 0, ...]``; every other row reads as stored, so one
    damaged chunk never hides the others (zarr raises for the whole selection on one bad chunk)."""
    from featcache import format

    count, width = (int(size) for size in array.shape)
    rows = np.zeros((count, width), dtype=np.uint32)
    unreadable: list[int] = []
    for start in range(0, count, RECORDS_BLOCK):
        stop = min(start + RECORDS_BLOCK, count)
        try:
            rows[start:stop] = np.asarray(array[start:stop])
        except Exception:  # noqa: BLE001 - some row of the block is damaged: find which
            for row in range(start, stop):
                try:
                    rows[row] = np.asarray(array[row])
                except Exception:  # noqa: BLE001 - this row's chunk: cut short, fails its crc32c...
                    unreadable.append(row)
    damaged = sorted(set(unreadable) | set(np.flatnonzero(~np.isin(rows[:, 0], format.RECORDED_STATUSES)).tolist()))
    rows[damaged] = 0
    rows[damaged, 0] = format.STATUS_DAMAGED
    return rows, damaged
