"""What is at a cache location, and whether featcache may write (or erase) there.

A location is featcache's only when featcache marked it so: ``featcache build`` writes the
creation marker (``format.MARKER``) before anything else, then the group, the arrays and last the
manifest. Caches written before the marker existed are featcache's by their manifest. Anything
else (a directory with other files, a Zarr group featcache did not mark, a regular file) is never
written to nor erased, ``--force`` included; and a cache whose ``zarr.json`` lost its manifest while
samples are recorded is damage, never an interrupted creation.

Light on purpose (no zarr, no torch): ``featcache build`` checks ``--out`` with it before any model,
dataset or teacher work starts. Local paths are inspected with ``os``; URLs through fsspec.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from featcache.errors import CacheFormatError, ConfigError, FeatcacheError, NotACacheError, StoreAccessError
from featcache.format import ENTRIES, MARKER, RECORDS_ARRAY, Manifest

# store entries and leftovers featcache (or zarr on its behalf) writes in a cache; nothing else is erased
# the writer lock (``featcache.lock``): featcache's, never erased (the next writer may hold it), and not
# content: a directory holding only it is empty to a build
LOCK = "featcache.lock"
_ATOMIC_LEFTOVER = re.compile(r"^(zarr|featcache)\.[0-9a-f]{32}\.partial$")  # zarr's LocalStore temp files

ABSENT, EMPTY, CACHE, CREATING, DAMAGED, FOREIGN = "absent", "empty", "cache", "creating", "damaged", "foreign"


HDF5_SUFFIXES = (".h5", ".hdf5")


def is_url(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def is_hdf5(location: str | os.PathLike) -> bool:
    """True for an HDF5 export's path (``featcache export``: a local file ending .h5 or .hdf5): how the
    reader, ``inspect`` and the export tell one from a Zarr cache."""
    return not is_url(location) and os.fspath(location).lower().endswith(HDF5_SUFFIXES)


@dataclass(frozen=True)
class LocationState:
    """What ``inspect`` found at a location.

    ``kind``: ABSENT (nothing there), EMPTY (an empty directory), CACHE (a featcache manifest),
    CREATING (featcache's marker, no manifest, nothing recorded: a creation that was interrupted),
    DAMAGED (``problem`` says how) or FOREIGN (files featcache did not write; ``entries`` lists some).
    ``marked``: featcache provably wrote this location (its marker, or a featcache manifest).
    """

    location: str
    kind: str
    marked: bool = False
    entries: tuple[str, ...] = ()
    manifest: Any = None  # the raw manifest (``attributes["featcache"]``) when kind is CACHE
    problem: str = ""


class _Local:
    def __init__(self, location: str) -> None:
        self.root = os.path.abspath(location)  # as zarr takes it: no ~ expansion (the shell does that)

    def kind_of_root(self) -> str:
        if os.path.isdir(self.root):
            return "dir"
        if os.path.lexists(self.root):
            raise ConfigError(f"--out {self.root} is a file, not a cache directory; choose a directory path "
                              "(featcache creates it)")
        parent = os.path.dirname(self.root)
        while not os.path.lexists(parent):  # ends at "/" at the latest
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise ConfigError(f"--out {self.root}: {parent} is a file, not a directory; choose another path")
        return "absent"

    def list(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def read(self, key: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, key), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def has_files_under(self, prefix: str) -> bool:
        for _, _, files in os.walk(os.path.join(self.root, prefix)):
            if any(name != "zarr.json" for name in files):
                return True
        return False

    def write(self, key: str, data: bytes) -> None:
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, key)
        partial = f"{path}.{os.getpid()}.partial"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, path)

    def delete(self, name: str) -> None:
        import shutil

        path = os.path.join(self.root, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


class _Remote:
    def __init__(self, location: str, storage_options: dict[str, Any] | None) -> None:
        from fsspec.core import url_to_fs

        self.fs, self.root = url_to_fs(location, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def kind_of_root(self) -> str:
        if self.fs.isfile(self.root):
            raise ConfigError(f"--out {self.root} is an object, not a cache prefix; choose another URL")
        return "dir" if self.fs.exists(self.root) else "absent"

    def list(self) -> list[str]:
        try:
            return sorted(path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.root}/{key}")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def has_files_under(self, prefix: str) -> bool:
        try:
            files = self.fs.find(f"{self.root}/{prefix}")
        except FileNotFoundError:
            return False
        return any(not path.endswith("/zarr.json") for path in files)

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{key}", data)

    def delete(self, name: str) -> None:
        path = f"{self.root}/{name}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def _access(location: str | os.PathLike, storage_options: dict[str, Any] | None):
    location = os.fspath(location)
    return _Remote(location, storage_options) if is_url(location) else _Local(location)


def damaged_metadata(location: str | os.PathLike, exc: Exception) -> CacheFormatError:
    return CacheFormatError(
        f"{os.fspath(location)}: the cache's group metadata (zarr.json, which holds the manifest) is damaged "
        f"({type(exc).__name__}: {exc}); the samples' data was not touched. Restore zarr.json from a copy of the "
        "cache, or delete the cache and build it again")


def _read_marker(access) -> bool:
    raw = access.read(MARKER)
    if raw is None:
        return False
    try:
        return json.loads(raw).get("format") == "featcache"
    except (ValueError, AttributeError):
        return False


def _few(entries: list[str], count: int = 5) -> str:
    shown = ", ".join(entries[:count])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > count else "")


def _recovery(where: str, marked: bool) -> str:
    if marked:
        return "or, to discard the cache, `featcache build ... --force` (it erases only featcache's files)"
    return f"or, if the cache is disposable, delete {where} yourself and build again"


def inspect(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> LocationState:
    """What is at ``location`` (see ``LocationState``); raises ConfigError when it is a file, and
    StoreAccessError when a URL's store cannot be reached (no credentials, endpoint down)."""
    if not is_url(location):
        return _inspect(location, storage_options)
    try:
        return _inspect(location, storage_options)
    except (FeatcacheError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - botocore's, aiohttp's, gcsfs'...: named in one line
        raise StoreAccessError(
            f"{os.fspath(location)}: the store cannot be reached ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); check its credentials (the environment, ~/.aws/credentials, or "
            "--storage-options '{\"key\": ..., \"secret\": ...}') and its endpoint (--storage-options "
            "'{\"client_kwargs\": {\"endpoint_url\": ...}}')") from exc


def _inspect(location: str | os.PathLike, storage_options: dict[str, Any] | None) -> LocationState:
    where = os.fspath(location)
    access = _access(location, storage_options)
    if access.kind_of_root() == "absent":
        return LocationState(where, ABSENT)
    entries = [name for name in access.list() if name != LOCK]
    if not entries:
        return LocationState(where, EMPTY)
    marked = _read_marker(access)
    raw = access.read("zarr.json")
    if raw is None:
        return _without_manifest(
            where, access, marked, entries,
            damage=f"{where}: zarr.json (the group metadata, which holds the manifest) is missing while records/ "
                   "holds recorded samples: damage, not an interrupted creation, and nothing was touched.",
            foreign=f"{where} is not empty and is not a featcache cache (it holds {_few(entries)})")
    try:
        metadata = json.loads(raw)
        if not isinstance(metadata, dict):
            raise ValueError(f"the metadata is a JSON {type(metadata).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        return LocationState(where, DAMAGED, marked=marked, entries=tuple(entries),
                             problem=str(damaged_metadata(where, exc)))
    attributes = metadata.get("attributes")
    manifest = attributes.get("featcache") if isinstance(attributes, dict) else None
    if manifest is not None:
        if isinstance(manifest, dict) and manifest.get("format") == "featcache":
            return LocationState(where, CACHE, marked=True, entries=tuple(entries), manifest=manifest)
        return LocationState(where, DAMAGED, marked=marked, entries=tuple(entries),
                             problem=f"{where}: zarr.json's featcache manifest is not a featcache manifest "
                                     f"({type(manifest).__name__}); restore zarr.json from a copy of the cache")
    return _without_manifest(
        where, access, marked, entries,
        damage=f"{where}: zarr.json parses but holds no featcache manifest, while records/ holds recorded samples: "
               "the manifest was lost (damage, not an interrupted creation), and nothing was touched.",
        foreign=f"{where} holds a Zarr group featcache did not create (no featcache marker or manifest; it holds "
                f"{_few(entries)})")


def _without_manifest(where: str, access: Any, marked: bool, entries: list[str], damage: str,
                      foreign: str) -> "LocationState":
    """A non-empty location with no featcache manifest: damage when records/ holds recorded samples
    (marked or not), an interrupted creation when featcache's marker is there, else not featcache's."""
    if access.has_files_under(RECORDS_ARRAY):
        return LocationState(where, DAMAGED, marked=marked, entries=tuple(entries),
                             problem=f"{damage} Restore zarr.json from a copy of the cache, {_recovery(where, marked)}")
    if marked:
        return LocationState(where, CREATING, marked=True, entries=tuple(entries))
    return LocationState(where, FOREIGN, entries=tuple(entries), problem=foreign)


def check_build_target(location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                       force: bool = False) -> LocationState:
    """``inspect``, then refuse what a build must not touch: a file (ConfigError), files featcache did
    not write (NotACacheError, ``--force`` or not), a damaged cache (CacheFormatError; with ``force``
    only when featcache provably wrote it). A CACHE state is returned for the caller to resume,
    compare or (``force``) rebuild."""
    state = inspect(location, storage_options)
    if state.kind == FOREIGN:
        raise NotACacheError(
            f"{state.problem}. featcache writes only into a new or empty directory or one of its own caches, and "
            f"never erases files it did not write (--force included): pass a new path, e.g. --out "
            f"{os.path.join(os.fspath(location), 'cache')}")
    if state.kind == DAMAGED and not (force and state.marked):
        raise CacheFormatError(state.problem)
    if state.kind == CACHE and not force:
        Manifest.from_dict(state.manifest, where=state.location)  # a damaged manifest is refused now, by name
    return state


def erase(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Delete featcache's own entries at ``location`` (``ENTRIES`` and zarr's temp files), nothing else."""
    access = _access(location, storage_options)
    if access.kind_of_root() == "absent":
        return
    for name in access.list():
        if name in ENTRIES or _ATOMIC_LEFTOVER.match(name):
            access.delete(name)


def write_marker(location: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """The creation marker: written before anything else of a new cache, it makes the location featcache's."""
    _access(location, storage_options).write(MARKER, json.dumps({
        "format": "featcache", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "written by featcache before anything else of this cache; see FORMAT.md"}).encode())
