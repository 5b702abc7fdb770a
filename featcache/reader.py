"""Read a feature cache: ``FeatureCache(location)[key] -> {layer: tensor}``.

Read-only, and safe in DataLoader worker processes: the store is opened lazily, once per
process, and the object pickles without its open handles. Every read checks the sample's
records row (complete?) and its chunks' checksums, so a damaged or missing chunk is an error naming
the sample and layer, never zeros or garbage handed to a trainer. (A chunk moved intact from another
row is left to ``featcache verify``, which also sums the values: see FORMAT.md.)

The same class reads an HDF5 export (``featcache export --format hdf5``): same layout, same checks.
"""
from __future__ import annotations

import collections
import collections.abc
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from featcache import codecs, format, handoff, store
from featcache.backends import Read, open_source
from featcache.boxes import TeacherBoxes
from featcache.errors import (CacheFormatError, CacheNotFoundError, CorruptSampleError, NoBoxesError,
                              SampleKeyTypeError, SampleNotCachedError, UnknownLayerError)


def _strings(values: Any) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def sums_values(verify: bool, check_values: bool, chunks_checked: bool) -> bool:
    """The checksum policy: whether a read sums a layer's values against the crc32c the build recorded.

    With ``verify`` every chunk read is checked: one carrying its own crc32c (``codecs.checksummed``) by
    that, as it is decompressed (``backends.row_chunk_decompressor``: a mismatch fails the read, reported
    as CorruptSampleError), its values summed as well only with ``check_values`` (what ``featcache verify``
    runs: it also catches an intact chunk that is not the one the build recorded); a layer any of whose
    chunks carry none, by its values. Without ``verify`` nothing is checked, except that a chunk that was
    never written is always compared with the record (``FeatureCache._checked``)."""
    return verify and (check_values or not chunks_checked)


class FeatureCache(collections.abc.Mapping):
    """A read-only view of one cache: a ``Mapping`` of sample key -> ``{layer: float32 tensor}``.

    ``keys()``, ``items()``, ``values()``, ``in``, ``len`` and ``get`` work as for a mapping, keys
    in row order; ``row_keys[row]`` is the key of a row. ``len`` counts every row, built or not: a
    key of a sample not built yet (or invalid) is ``in`` the cache, and reading it raises
    ``SampleNotCachedError`` naming it (``get`` too: its default is only for keys not in the cache).
    Keys are str (a token, or a lidar path relative to the data root); a key of another type raises
    ``SampleKeyTypeError`` (a KeyError and a TypeError) saying so. A layer name the cache does not
    hold raises ``UnknownLayerError`` listing those it does. Equality is identity: comparing two
    caches' contents would read every sample (compare ``manifest``, ``row_keys`` or run ``verify``).

    Args:
        location: cache directory, fsspec URL, or an ``.h5`` export.
        storage_options: fsspec options for URLs (credentials, endpoint).
        verify: check every chunk read: its crc32c (caches written with chunk checksums, see
            ``codecs.checksummed``), else each layer's values against the checksum in ``records``.
        check_values: with ``verify``, also sum every layer's values against ``records`` when its
            chunks carry their own crc32c: catches a chunk that is intact but not the one the build
            recorded (what ``featcache verify`` runs; the checksum then covers the decompressed values, not
            the compressed bytes).
    """

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 verify: bool = True, check_values: bool = False) -> None:
        self.location = os.fspath(location)
        self.storage_options = storage_options
        self.verify, self.check_values = verify, check_values
        self._source = open_source(self.location, storage_options, verify)  # local, fsspec or HDF5 (``backends``)
        group = self._open()
        raw = group.attrs.get("featcache")
        if isinstance(raw, (str, bytes)):  # HDF5 keeps the manifest as JSON text
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise CacheFormatError(f"{self.location}: damaged manifest (the featcache attribute is not JSON: "
                                       f"{exc}); restore it from a copy of the cache, or rebuild with "
                                       "`featcache build --force`") from exc
        damage = self._source.damage() if raw is None else None
        if damage is not None:  # the manifest was lost next to recorded samples: say so
            raise damage
        self.manifest = format.Manifest.from_dict(raw, where=self.location)
        self.row_keys: tuple[str, ...] = tuple(_strings(group[format.KEYS_ARRAY][:]))
        format.check_keys_are_identities(self.manifest, self.row_keys, where=self.location)
        # each row's lidar file relative to the data root (``samples.sample_source``); None for caches
        # written before featcache recorded them
        self.sources: tuple[str, ...] | None = (tuple(_strings(group[format.SOURCES_ARRAY][:]))
                                                if format.SOURCES_ARRAY in group else None)
        self._rows = {key: row for row, key in enumerate(self.row_keys)}

    def _open(self) -> Any:
        """The opened group (zarr group or h5py file), once per process (``backends.ChunkSource.root``)."""
        return self._source.root

    # -- lookup ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row_keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.row_keys)

    __eq__ = object.__eq__  # see the class docstring; Mapping's would read every sample
    __hash__ = object.__hash__

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]`` if ``key`` is in the cache, else ``default``; a sample in the cache but not
        readable (not built yet, invalid, corrupt) raises, never reads as ``default``."""
        self._check_key(key)
        return self[key] if key in self._rows else default

    @property
    def layer_names(self) -> list[str]:
        return self.manifest.layer_names

    def _check_key(self, key: object) -> None:
        if isinstance(key, str):
            return
        example = f"e.g. {self.row_keys[0]!r}" if self.row_keys else "none yet"
        hint = (f" Did you mean cache[{str(key)!r}]?" if str(key) in self._rows else "") + (
            " For the sample in row N, use read_row(N) or row_keys[N]." if isinstance(key, (int, np.integer)) else "")
        raise SampleKeyTypeError(f"cache {self.location} is keyed by str (sample token, else lidar path relative "
                                 f"to the data root; {example}), not {type(key).__name__}: got {key!r}.{hint}")

    def _check_layers(self, layers: Sequence[str] | str | None) -> list[str] | None:
        """``layers`` as a list (None: all), every name one the cache holds (else UnknownLayerError)."""
        if layers is None:
            return None
        layers = [layers] if isinstance(layers, str) else list(layers)
        unknown = [name for name in layers if name not in self.manifest.layer_names]
        if unknown:
            raise UnknownLayerError(f"layer(s) {', '.join(map(repr, unknown))} not in cache {self.location}; it holds "
                                    f"{', '.join(self.manifest.layer_names)}")
        return layers

    def row_of(self, key: str) -> int:
        self._check_key(key)
        try:
            return self._rows[key]
        except KeyError:
            raise SampleNotCachedError(f"sample {key!r} is not in cache {self.location} "
                                       f"({len(self)} samples, split {self.manifest.split!r})") from None

    def status(self) -> np.ndarray:
        """Per-row status (format.STATUS_*) of every sample; ``STATUS_DAMAGED`` where the records row cannot
        be read or trusted (``store.read_records``: that row alone)."""
        return store.read_records(self._open()[format.RECORDS_ARRAY])[0][:, 0]

    # -- reading --------------------------------------------------------------------------
    def read_row(self, row: int, layers: list[str] | None = None, decode: bool = True) -> dict[str, np.ndarray]:
        """One sample's features as float32 arrays (``decode=False``: stored values, int8 undecoded)."""
        stored = self.read_row_stored(row, self._check_layers(layers))
        if not decode:
            return {name: values for name, (values, _) in stored.items()}
        return {name: codecs.decode(values, self.manifest.layer(name).codec, qparams)
                for name, (values, qparams) in stored.items()}

    def read_row_stored(self, row: int, layers: list[str] | None = None
                        ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """One sample's stored values and int8 scale/offset per layer, checksums verified, not decoded.

        For readers that decode elsewhere (``codecs.decode_tensor`` on the training device): the
        float conversion is then off the DataLoader workers and their hand-off is 2-4x smaller.
        """
        return {name: (values.numpy(), None if qparams is None else qparams.numpy())
                for name, (values, qparams) in self._read_stored(row, layers, shared=False).items()}

    def read_row_tensors(self, row: int, layers: list[str] | None = None
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """``read_row_stored`` as torch tensors; inside a DataLoader worker they are decompressed
        straight into shared memory the worker reuses row after row (``featcache.handoff``), so
        handing the sample to the training process copies nothing and touches no fresh page (torch
        would otherwise copy every tensor into new shared memory to send it, which costs about as
        much as decompressing the row: BENCHMARKS.md, read path)."""
        return self._read_stored(row, layers, shared=torch.utils.data.get_worker_info() is not None)

    def _read_stored(self, row: int, layers: list[str] | None, shared: bool
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The checked read behind ``read_row_stored`` / ``read_row_tensors`` (``shared``: outputs in
        shared memory)."""
        layers = self._check_layers(layers)
        if not isinstance(row, (int, np.integer)) or not 0 <= row < len(self.row_keys):
            raise IndexError(f"row {row!r} is not a row of cache {self.location} (0 to {len(self.row_keys) - 1}); "
                             "look samples up by key with cache[key]")
        key = self.row_keys[row]
        wanted = [(position, layer) for position, layer in enumerate(self.manifest.layers)
                  if layers is None or layer.name in layers]
        summed = {layer.name: sums_values(self.verify, self.check_values,
                                          all(self._source.chunks_checked(array.path) for array in layer.arrays()))
                  for _, layer in wanted}
        arrays = [(array, summed[layer.name] and array is layer.values_array)  # scales: chained below
                  for _, layer in wanted for array in layer.arrays()]
        if shared:
            outputs = handoff.shared_tensors([(array.row_shape, array.dtype) for array, _ in arrays])
        else:
            outputs = [torch.from_numpy(np.empty(array.row_shape, array.dtype)) for array, _ in arrays]
        records = self.manifest.records_array
        # a layer's checksum runs over its values, then its int8 scales: the values' sum is taken where
        # they are decompressed, the scales' (a few KB) chained to it below. The record's own chunk ends with
        # its crc32c, checked as the features' (caches written before: its status is checked below).
        results = self._source.fetch(row, {
            records.path: Read(torch.from_numpy(np.empty(records.row_shape, records.dtype)), False),
            **{array.path: Read(output, checksum) for (array, checksum), output in zip(arrays, outputs)}})
        record = results[records.path]
        if isinstance(record, (CacheFormatError, CacheNotFoundError)):  # the cache's problem, not the sample's
            raise record
        if isinstance(record, BaseException):
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row cannot be "
                                     f"read ({type(record).__name__}: {record}); run `featcache verify --repair`"
                                     ) from record
        record = record[0].numpy()
        self._check_complete(record, key, row)
        return {layer.name: self._checked(layer, [results[array.path] for array in layer.arrays()],
                                          int(record[1 + position]), summed[layer.name], key, row)
                for position, layer in wanted}

    def _checked(self, layer: format.LayerSpec, fetched: list[Any], recorded: int, summed: bool, key: str, row: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer's (values, scales) as read (``fetched``: its arrays' ``ChunkSource.fetch`` results), held
        to the ``records`` checksum ``recorded`` where ``sums_values`` says (``summed``) or a chunk was never
        written; CorruptSampleError naming the sample and layer when a read failed or the checksum differs."""
        failure = next((part for part in fetched if isinstance(part, BaseException)), None)
        if isinstance(failure, (CacheFormatError, CacheNotFoundError)):  # the cache's problem, not the sample's
            raise failure
        if failure is not None:
            raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                     f"cannot be decoded: {type(failure).__name__}: {failure}; "
                                     "run `featcache verify --repair`") from failure
        (values, crc), (scales, scales_crc) = fetched[0], (fetched[1] if len(fetched) > 1 else (None, None))
        # a crc32c nobody asked for means a chunk was missing (``backends._decompress_row_chunk``): compare it
        if summed or crc is not None or scales_crc is not None:
            crc = crc if crc is not None else format.checksum(values.numpy())
            if scales is not None:
                crc = format.checksum(scales.numpy(), start=crc)
            if crc != recorded:
                raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                         "fails the checksum the build recorded (damaged, missing or replaced chunk); "
                                         "run `featcache verify --repair`")
        return values, scales

    def _check_complete(self, record: np.ndarray, key: str, row: int) -> None:
        """SampleNotCachedError unless the records row says the sample is complete; CorruptSampleError when
        it holds no status featcache writes (flipped bytes)."""
        if record[0] not in format.RECORDED_STATUSES:
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row is damaged "
                                     f"(status {int(record[0])} is none featcache writes); run `featcache verify "
                                     "--repair`")
        if record[0] != format.STATUS_COMPLETE:
            deleted = self._source.deleted() if record[0] == format.STATUS_MISSING else None
            if deleted is not None:  # a missing chunk of a cache that is gone, not a sample not built yet
                raise deleted
            state = "was invalid (non-finite teacher output)" if record[0] == format.STATUS_INVALID else "is not written yet"
            raise SampleNotCachedError(f"sample {key!r} (row {row}) in {self.location} {state}; "
                                       "run `featcache build` again to complete the cache")

    def read_boxes(self, row: int) -> TeacherBoxes:
        """The teacher's predictions for the sample in ``row`` (``featcache build --boxes``): boxes in the
        cache's frame (the un-augmented scan), scores and labels indexing ``manifest.boxes.classes``.

        Checked like features: the row's status, and the checksum the build recorded over the stored row,
        which also catches a chunk that went missing (zarr would read it as zeros)."""
        spec = self.manifest.boxes
        if spec is None:
            raise NoBoxesError(f"cache {self.location} holds no teacher boxes; build it with `featcache build "
                               "--boxes` (a new --out, or --force: boxes change what every sample stores)")
        if not isinstance(row, (int, np.integer)) or not 0 <= row < len(self.row_keys):
            raise IndexError(f"row {row!r} is not a row of cache {self.location} (0 to {len(self.row_keys) - 1}); "
                             "look samples up by key with teacher_boxes(key)")
        key, root = self.row_keys[row], self._open()
        try:
            record = np.asarray(root[format.RECORDS_ARRAY][row])
        except Exception as exc:  # noqa: BLE001 - reported by name
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row cannot be read "
                                     f"({type(exc).__name__}: {exc}); run `featcache verify --repair`") from exc
        self._check_complete(record, key, row)
        try:
            stored = np.ascontiguousarray(root[format.BOXES_ARRAY][row], dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - e.g. a damaged chunk failing its crc32c
            raise CorruptSampleError(f"sample {key!r} (row {row}) teacher boxes in {self.location} cannot be read: "
                                     f"{type(exc).__name__}: {exc}; run `featcache verify --repair`") from exc
        if format.checksum(stored) != int(record[self.manifest.boxes_record_column]):
            raise CorruptSampleError(f"sample {key!r} (row {row}) teacher boxes in {self.location} fail the checksum "
                                     "the build recorded (damaged, missing or replaced chunk); run `featcache verify "
                                     "--repair`")
        return spec.unpack(stored)

    def teacher_boxes(self, key: str) -> TeacherBoxes:
        """``read_boxes`` of the sample ``key``."""
        return self.read_boxes(self.row_of(key))

    def prefetch(self, rows: Iterable[int], layers: list[str] | None = None) -> None:
        """Start fetching these rows' chunks from disk into the page cache and return at once.

        For readers that know which rows come next (``ReadaheadSampler``): a cold read then finds
        its chunks in memory instead of waiting for the disk in the middle of a row. Local caches
        only (``posix_fadvise(WILLNEED)`` per chunk file, issued on a background thread of this
        process, since the kernel fills the page cache in the caller); a no-op for URLs and HDF5.
        Unknown rows and missing files are skipped: this is a hint, the read checks everything.
        """
        rows = list(rows)
        layers = self._check_layers(layers)
        if not rows:
            return
        paths = [format.RECORDS_ARRAY] + [array.path for layer in self.manifest.layers
                                          if layers is None or layer.name in layers for array in layer.arrays()]
        self._source.prefetch([row for row in rows if 0 <= row < len(self.row_keys)], paths)

    def read(self, key: str, layers: list[str] | None = None) -> dict[str, np.ndarray]:
        """One sample's features (float32 arrays) by key; ``layers``: a subset of ``layer_names``."""
        return self.read_row(self.row_of(key), layers)

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(value) for name, value in self.read(key).items()}

    def close(self) -> None:
        self._source.close()


class ReadaheadSampler(torch.utils.data.Sampler):
    """Wraps a sampler of dataset indices and, ``depth`` indices before yielding each one, has the
    cache prefetch that index's row (``FeatureCache.prefetch``).

    A DataLoader asks its sampler for indices ahead of the workers that will read them, and the
    order is otherwise known to no one, so the sampler is where cold reads can be announced. The
    page-cache fill then runs while the workers decompress earlier rows, instead of inside a read.

    Args:
        sampler: any sampler of dataset indices (iterable, with a length); ``set_epoch`` is passed on.
        cache: the cache whose rows the dataset reads.
        rows: ``rows[index]`` is the cache row of dataset item ``index`` (None: row ``index``; out of
            range, e.g. -1: nothing to prefetch).
        depth: how many indices ahead of the one yielded to prefetch, on top of the DataLoader's own
            lead (``prefetch_factor`` batches per worker).
        layers: the layers the reader reads (default: all).
    """

    def __init__(self, sampler: Iterable[int], cache: FeatureCache, rows: Sequence[int] | None = None,
                 depth: int = 4, layers: list[str] | None = None) -> None:
        self.sampler, self.cache, self.depth, self.layers = sampler, cache, max(0, depth), layers
        self.rows = list(range(len(cache))) if rows is None else list(rows)

    def __iter__(self) -> Iterator[int]:
        upcoming: collections.deque[int] = collections.deque()
        for index in self.sampler:
            self.cache.prefetch([self.rows[index]], self.layers)
            upcoming.append(index)
            if len(upcoming) > self.depth:
                yield upcoming.popleft()
        yield from upcoming

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def open_cache(location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
               verify: bool = True, check_values: bool = False) -> FeatureCache:
    """Open a cache read-only (``verify``, ``check_values``: see FeatureCache); raises
    CacheNotFoundError / CacheFormatError with what to do."""
    try:
        return FeatureCache(location, storage_options=storage_options, verify=verify, check_values=check_values)
    except KeyError as exc:
        raise CacheFormatError(f"{os.fspath(location)}: incomplete cache layout ({exc} missing)") from exc
