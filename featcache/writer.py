"""Write samples into a feature cache: synchronously, or from a background thread.

Crash safety comes from ordering, not locks: a sample's feature chunks (each written atomically
by the store, ``.partial`` then rename on local disk) go first, its ``records`` row last. A
crash before the row is written leaves the sample unrecorded, and the next run recomputes it.
Each rank writes only its own rows, and every row is its own chunk, so ranks never share an
object.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from featcache import codecs, format, store
from featcache import location as location_
from featcache.errors import FeatcacheError, InvalidFeatureError


@dataclass
class WriteStats:
    samples: int = 0
    invalid: int = 0
    raw_bytes: int = 0  # float32-equivalent bytes of the features written
    stored_bytes: int = 0  # bytes in the store after compression (0 when the store cannot say)


def _strings(values: Any) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def _array(group, path: str, location: str):
    """The cache's array at ``path``; CacheFormatError naming it when the manifest names one the cache does not
    hold (or cannot, e.g. a layer renamed ``../x`` in zarr.json)."""
    try:
        return group[path]
    except Exception as exc:  # noqa: BLE001 - KeyError for a missing array, ValueError for a path zarr refuses
        raise store.array_problem(location, path, exc) from exc


class CacheWriter:
    """Read-write handle on a cache; create it with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, group, manifest: format.Manifest, location: str) -> None:
        self.group = group
        self.manifest = manifest
        self.location = location
        self._features = {layer.name: _array(group, layer.values_array.path, location) for layer in manifest.layers}
        self._qparams = {layer.name: _array(group, layer.qparams_array.path, location)
                         for layer in manifest.layers if layer.qparams_array is not None}
        self._records = _array(group, format.RECORDS_ARRAY, location)
        self._boxes = _array(group, format.BOXES_ARRAY, location) if manifest.boxes is not None else None
        self.stats = WriteStats()

    @classmethod
    def create(cls, location: str, manifest: format.Manifest, keys: Sequence[str],
               storage_options: dict[str, Any] | None = None, sources: Sequence[str] | None = None
               ) -> "CacheWriter":
        """Create an empty cache for ``keys`` (row order) and their ``sources`` (each sample's lidar
        file relative to the data root, ``samples.sample_source``).

        Order: the creation marker first (the location is featcache's from then on), then the group,
        the arrays, and last the manifest (a cache whose manifest exists has all its arrays). What
        is at ``location`` must be nothing, an empty directory, or featcache's own (a cache, an
        interrupted creation): only featcache's entries are erased (``featcache.location.erase``),
        files of anyone else's are left as they are, and a location holding only those is refused
        (NotACacheError)."""
        if len(keys) != manifest.num_samples:
            raise ValueError(f"{len(keys)} keys for a manifest of {manifest.num_samples} samples")
        if sources is not None and len(sources) != len(keys):
            raise ValueError(f"{len(sources)} sources for {len(keys)} keys")
        state = location_.check_build_target(location, storage_options, force=True)
        if state.kind in (location_.CACHE, location_.CREATING, location_.DAMAGED):
            location_.erase(location, storage_options)
        location_.write_marker(location, storage_options)
        group = store.open_group(location, mode="a", storage_options=storage_options)  # no zarr.json is left here
        n = manifest.num_samples
        group.create_array(format.KEYS_ARRAY, shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.asarray(keys, dtype=str)
        if sources is not None:
            group.create_array(format.SOURCES_ARRAY, shape=(n,), dtype=str,
                               chunks=(max(n, 1),))[:] = np.asarray(sources, dtype=str)
        # each layer's values and int8 scales, the boxes, then the records; each records chunk ends with
        # its crc32c: a damaged row is that row's damage alone (``store.read_records``), never a status or
        # checksum taken for the build's
        for array in manifest.arrays():
            group.create_array(array.path, shape=array.shape(n), chunks=array.chunks, dtype=array.dtype, fill_value=0,
                               **array.zarr_codecs())
        # The manifest goes last: a cache whose manifest exists has all its arrays.
        group.attrs["featcache"] = manifest.to_dict()
        return cls(group, manifest, location)

    @classmethod
    def open(cls, location: str, storage_options: dict[str, Any] | None = None) -> "CacheWriter":
        group = store.open_group(location, mode="r+", storage_options=storage_options)
        manifest = format.Manifest.from_dict(group.attrs.get("featcache"), where=location)
        writer = cls(group, manifest, location)
        format.check_keys_are_identities(manifest, writer.keys(), where=location)
        return writer

    def keys(self) -> list[str]:
        """The cache's sample keys, in row order."""
        return _strings(self.group[format.KEYS_ARRAY][:])

    def sources(self) -> list[str] | None:
        """Each row's source file (relative to the data root); None for caches written before sources."""
        if format.SOURCES_ARRAY not in self.group:
            return None
        return _strings(self.group[format.SOURCES_ARRAY][:])

    def status(self) -> np.ndarray:
        """Per-row status (format.STATUS_*), read from every records chunk; ``STATUS_DAMAGED`` for a row
        whose record cannot be read or trusted (``store.read_records``): the build rebuilds it."""
        return store.read_records(self._records)[0][:, 0]

    def write_sample(self, row: int, features: dict[str, np.ndarray], boxes: np.ndarray | None = None,
                     non_finite: str | None = None) -> None:
        """Encode, store and record one sample; raises InvalidFeatureError (nothing written) on NaN/Inf.
        ``boxes``: the packed boxes row (``BoxesSpec.pack``), required when the cache holds boxes.
        ``non_finite``: what the build found non-finite in teacher outputs the cache does not store but
        derives from (the head its boxes were decoded from): the sample is invalid as well."""
        if non_finite is not None:
            raise InvalidFeatureError(non_finite)
        for name, value in features.items():
            if not np.isfinite(value).all():
                bad = int(np.size(value) - np.isfinite(value).sum())
                raise InvalidFeatureError(f"layer {name!r}: {bad} non-finite values")
        if (boxes is None) != (self._boxes is None):
            raise ValueError(f"row {row}: this cache {'holds' if self._boxes is not None else 'holds no'} teacher "
                             f"boxes, and the sample came {'without' if boxes is None else 'with'} them")
        if boxes is not None and not np.isfinite(boxes).all():
            raise InvalidFeatureError(f"teacher boxes: {int(np.size(boxes) - np.isfinite(boxes).sum())} non-finite values")
        checksums = []
        for layer in self.manifest.layers:
            value = features[layer.name]
            if tuple(value.shape) != layer.shape:
                raise InvalidFeatureError(f"layer {layer.name!r} has shape {tuple(value.shape)}, cache expects {layer.shape}")
            stored, qparams = codecs.encode(value, layer.codec)
            self._features[layer.name][row] = stored
            if qparams is not None:
                self._qparams[layer.name][row] = qparams
                checksums.append(format.checksum(stored, qparams))
                # the int8 scales are stored bytes too (inspection.stored_bytes_per_sample counts them alike)
                self.stats.stored_bytes += store.chunk_nbytes(self._qparams[layer.name], row) or 0
            else:
                checksums.append(format.checksum(stored))
            self.stats.raw_bytes += value.size * 4
            self.stats.stored_bytes += store.chunk_nbytes(self._features[layer.name], row) or 0
        if boxes is not None:
            self._boxes[row] = boxes
            checksums.append(format.checksum(boxes))
            self.stats.stored_bytes += store.chunk_nbytes(self._boxes, row) or 0
        # last: the row is complete only once every chunk above is written
        self._records[row] = np.asarray([format.STATUS_COMPLETE, *checksums], dtype=np.uint32)
        self.stats.samples += 1

    def mark_invalid(self, row: int) -> None:
        self._records[row] = np.asarray([format.STATUS_INVALID] + [0] * (self.manifest.records_width - 1),
                                        dtype=np.uint32)
        self.stats.invalid += 1

    def clear(self, rows: Sequence[int]) -> None:
        """Forget rows (``verify --repair``): their records go back to missing before rebuilding."""
        for row in rows:
            self._records[row] = np.zeros(self.manifest.records_width, dtype=np.uint32)

    def set_progress(self, **info: Any) -> None:
        """Summary attributes (counts, finish time) for `inspect`; not used for correctness."""
        self.group.attrs["featcache_progress"] = {**info, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


class BackgroundWriter:
    """Feeds a :class:`CacheWriter` from a thread through a bounded queue, so encoding and I/O
    overlap the teacher's next forward. The queue bound caps memory (``depth`` samples)."""

    _STOP = object()

    def __init__(self, writer: CacheWriter, depth: int = 4, on_invalid=None) -> None:
        self.writer = writer
        self.on_invalid = on_invalid
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="featcache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                return
            if self._error is not None:
                continue  # drain without writing after a failure
            row, key, features, boxes, non_finite = item
            try:
                self.writer.write_sample(row, features, boxes, non_finite)
            except InvalidFeatureError as exc:
                self.writer.mark_invalid(row)
                if self.on_invalid is not None:
                    self.on_invalid(key, exc)
            except BaseException as exc:  # surfaced to the producer by submit()/close()
                self._error = FeatcacheError(f"writing sample {key!r} (row {row}) to {self.writer.location} "
                                             f"failed: {type(exc).__name__}: {exc}")
                self._error.__cause__ = exc

    def submit(self, row: int, key: str, features: dict[str, np.ndarray], boxes: np.ndarray | None = None,
               non_finite: str | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((row, key, features, boxes, non_finite))

    def close(self) -> None:
        """Write everything queued, stop the thread, and raise the first write error if any."""
        self._queue.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error
