"""Open a cache location (local directory or fsspec URL) as a Zarr v3 group.

Both go through the same call: zarr picks a LocalStore for paths and an FsspecStore for URLs
(``s3://bucket/cache``, ``memory://x``...), with ``storage_options`` passed to fsspec.
"""
from __future__ import annotations

import os
from typing import Any

import zarr

from featcache.errors import CacheFormatError, CacheNotFoundError, FeatcacheError

# What zarr raises on a group zarr.json that is not valid metadata (garbage bytes, cut short, not
# an object); its own not-found errors are ValueErrors too, so those are caught first.
DAMAGED_METADATA_ERRORS = (ValueError, TypeError, AttributeError)


def is_url(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def _zarr_kwargs(location: str | os.PathLike, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"store": os.fspath(location), "zarr_format": 3}
    if is_url(location):
        kwargs["storage_options"] = storage_options or {}
    return kwargs


def exists(location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
           attribute: str = "featcache") -> bool:
    """True when a group with the manifest ``attribute`` exists. The manifest is written last when
    a cache is created, so a group without it is a creation that was interrupted (nothing in it
    can be recorded as complete) and counts as absent."""
    try:
        group = zarr.open_group(mode="r", **_zarr_kwargs(location, storage_options))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    except DAMAGED_METADATA_ERRORS as exc:
        # not "absent": a build would then re-create the cache and erase every recorded sample
        raise _damaged_metadata(location, exc) from exc
    return attribute in group.attrs


def open_group(location: str | os.PathLike, mode: str = "r", storage_options: dict[str, Any] | None = None):
    """``mode``: 'r' read-only, 'r+' existing read-write, 'w' create (erasing what is there)."""
    try:
        return zarr.open_group(mode=mode, **_zarr_kwargs(location, storage_options))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise CacheNotFoundError(f"no feature cache at {os.fspath(location)!r}; build one with "
                                 "`featcache build TEACHER_CONFIG CHECKPOINT --out ...`") from exc
    except PermissionError as exc:
        raise FeatcacheError(f"cannot open {os.fspath(location)!r} for {'writing' if mode != 'r' else 'reading'}: "
                             f"{exc}") from exc
    except DAMAGED_METADATA_ERRORS as exc:
        raise _damaged_metadata(location, exc) from exc


def _damaged_metadata(location: str | os.PathLike, exc: Exception) -> CacheFormatError:
    return CacheFormatError(
        f"{os.fspath(location)}: the cache's group metadata (zarr.json, which holds the manifest) is damaged "
        f"({type(exc).__name__}: {exc}); the samples' data was not touched. Restore zarr.json from a copy of the "
        "cache, or delete the cache and build it again")


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
