"""Read a feature cache: ``FeatureCache(location)[key] -> {layer: tensor}``.

Read-only, and safe in DataLoader worker processes: the store is opened lazily, once per
process, and the object pickles without its open handles. Every read checks the sample's
records row (complete?) and its chunks' checksums, so a damaged or missing chunk is an error naming
the sample and layer, never zeros or garbage handed to a trainer. (A chunk moved intact from another
row is left to ``featcache verify``, which also sums the values: see FORMAT.md.)

The same class reads an HDF5 export (``featcache export --format hdf5``): same layout, same checks.
"""
from __future__ import annotations

import asyncio
import collections
import collections.abc
import concurrent.futures
import json
import os
import sys
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from featcache import codecs, format, handoff, store
from featcache.boxes import TeacherBoxes
from featcache.errors import (CacheFormatError, CacheNotFoundError, CorruptSampleError, NoBoxesError,
                              SampleKeyTypeError, SampleNotCachedError, UnknownLayerError)

HDF5_SUFFIXES = (".h5", ".hdf5")


def _is_hdf5(location: str) -> bool:
    return not store.is_url(location) and location.lower().endswith(HDF5_SUFFIXES)


def _strings(values: Any) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def _is_hdf5_root(root: Any) -> bool:
    return type(root).__module__.startswith("h5py")


def _row_chunk_decompressor(metadata: Any, verify: bool = True) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """How to decompress one chunk of a cache array straight into the caller's output, or None if the
    array is not laid out as ``featcache.format`` writes it (one chunk per row, the bytes codec in
    native order, at most one zstd/blosc compressor, optionally zarr's crc32c last; then zarr's own
    path reads it). A chunk crc32c is checked first when ``verify``: a mismatch raises ValueError.

    zarr's pipeline decompresses a chunk into a new buffer and then copies it into ``out``; for a
    BEVFusion-lidar row that fresh allocation and copy cost about as much again as the decompression
    (BENCHMARKS.md, read path). A chunk that decompresses to fewer bytes than the output leaves the
    rest of it as it was: with a chunk crc32c, only a writer other than featcache's can produce one
    (``check_values`` catches it); without, the row's value checksum catches it, as any other damage.
    """
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    grid = getattr(metadata, "chunk_grid", None)
    codecs_ = list(getattr(metadata, "codecs", ()))
    checked = codecs.has_chunk_checksum(metadata)
    if checked:
        codecs_ = codecs_[:-1]
    if tuple(getattr(grid, "chunk_shape", ())) != (1, *metadata.shape[1:]) or not codecs_:
        return None
    serializer, compressors = codecs_[0], codecs_[1:]
    native = "little" if sys.byteorder == "little" else "big"
    if not isinstance(serializer, BytesCodec) or getattr(serializer.endian, "value", native) not in (None, native):
        return None
    if not compressors:
        def decompress(raw: np.ndarray, out: np.ndarray) -> None:
            out.reshape(-1).view(np.uint8)[:] = raw
    elif len(compressors) == 1 and isinstance(compressors[0], (ZstdCodec, BloscCodec)):
        codec = numcodecs.Zstd() if isinstance(compressors[0], ZstdCodec) else numcodecs.Blosc()

        def decompress(raw: np.ndarray, out: np.ndarray) -> None:
            codec.decode(raw, out=out)
    else:
        return None
    if not checked:
        return decompress

    def check_and_decompress(raw: np.ndarray, out: np.ndarray) -> None:
        if verify and (raw.size < 4 or format.checksum(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little")):
            raise ValueError(f"the chunk's {raw.size} bytes fail their crc32c (damaged or cut short)")
        decompress(raw[:-4], out)
    return check_and_decompress


class _CacheArray(NamedTuple):
    """What reading one of a cache's arrays needs, worked out once per process (zarr re-reads
    metadata on every group lookup)."""

    array: Any  # zarr: the async handle; HDF5: the h5py dataset
    decompress: Callable[[np.ndarray, np.ndarray], None] | None  # ``_row_chunk_decompressor``
    directory: str | None  # local zarr store: the array's directory, whose chunk files are read directly
    chunk_checksum: bool  # ``decompress`` checks each chunk's crc32c, so summing the values is optional

    def local_chunk_path(self, row: int) -> str:
        """The file holding sample ``row`` (local stores: ``directory`` is set)."""
        return os.path.join(self.directory, store.row_chunk_key(self.array, row))


def _read_chunk_file(path: str, spare: list[np.ndarray]) -> np.ndarray | None:
    """The bytes of one local chunk file, read into a buffer taken from ``spare`` (grown if too
    small), or None if the file does not exist (zarr: the chunk was never written). The caller puts
    the buffer back once done with it.

    zarr's LocalStore returns each chunk as a fresh bytes object, after an event-loop round trip and
    a thread hop per file; for a BEVFusion-lidar row that took about three times as long as reading
    the same files into reused buffers (profiled when this was written; the read-path figure of
    BENCHMARKS.md measures the whole read).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        buffer = spare.pop() if spare else np.empty(0, np.uint8)
        if buffer.size < size:
            buffer = np.empty(size, np.uint8)
        view, done = memoryview(buffer), 0
        while done < size:
            got = os.readv(fd, [view[done:size]])
            if got == 0:
                break  # the file shrank since fstat: what was read goes on, the checksum judges it
            done += got
        return buffer[:done]
    finally:
        os.close(fd)


def _decompress_row_chunk(cache_array: _CacheArray, raw: np.ndarray | None, values: np.ndarray,
                          checksum: bool) -> int | None:
    """Decompress one row's chunk bytes into ``values``; returns the values' crc32c if ``checksum``
    (run here, while the values may still be in this core's cache).

    A chunk that does not exist (``raw`` None) reads as the fill value, as in zarr, and its crc32c is
    always returned: zarr stores no chunk for a row equal to the fill value (an all-zero map, a
    records row not yet written), so only the checksum the build recorded tells that from a lost
    chunk, and the caller must compare it.
    """
    if raw is None:
        values[...] = cache_array.array.metadata.fill_value
        return format.checksum(values)
    cache_array.decompress(raw, values)
    return format.checksum(values) if checksum else None


def _row_specs(layer: format.LayerSpec) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The arrays holding one row of ``layer`` as (path, per-row shape, dtype): its stored values,
    then, for int8, its per-channel scale and offset."""
    specs = [(format.feature_path(layer.name), layer.shape, layer.codec.storage_dtype)]
    if layer.codec.precision == "int8":
        specs.append((format.qparams_path(layer.name), (2, layer.shape[0]), np.dtype(np.float32)))
    return specs


def _advise_will_need(paths: list[str]) -> None:
    """Have the kernel start reading these files into the page cache (``FeatureCache.prefetch``)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


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
        self._pid: int | None = None
        self._root: Any = None
        self._arrays: dict[str, _CacheArray] = {}  # per process, by array path
        self._io: concurrent.futures.ThreadPoolExecutor | None = None  # per process: local chunk reads
        self._readahead: concurrent.futures.ThreadPoolExecutor | None = None  # per process: ``prefetch``
        self._spare_buffers: dict[str, list[np.ndarray]] = {}  # per process: chunk bytes buffers, by array path
        group = self._open()
        raw = group.attrs.get("featcache")
        if isinstance(raw, (str, bytes)):  # HDF5 keeps the manifest as JSON text
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise CacheFormatError(f"{self.location}: damaged manifest (the featcache attribute is not JSON: "
                                       f"{exc}); restore it from a copy of the cache, or rebuild with "
                                       "`featcache build --force`") from exc
        if raw is None and not _is_hdf5(self.location):
            from featcache import location as locations

            state = locations.inspect(self.location, storage_options)
            if state.kind == locations.DAMAGED:  # the manifest was lost next to recorded samples: say so
                raise CacheFormatError(state.problem)
        self.manifest = format.Manifest.from_dict(raw, where=self.location)
        self.row_keys: tuple[str, ...] = tuple(_strings(group[format.KEYS_ARRAY][:]))
        format.check_keys_are_identities(self.manifest, self.row_keys, where=self.location)
        # each row's lidar file relative to the data root (``models.sample_source``); None for caches
        # written before featcache recorded them
        self.sources: tuple[str, ...] | None = (tuple(_strings(group[format.SOURCES_ARRAY][:]))
                                                if format.SOURCES_ARRAY in group else None)
        self._rows = {key: row for row, key in enumerate(self.row_keys)}

    # -- process-local handles ------------------------------------------------------------
    def _open(self):
        if self._root is None or self._pid != os.getpid():
            if _is_hdf5(self.location):
                import h5py

                if not os.path.isfile(self.location):
                    raise CacheNotFoundError(f"no HDF5 cache at {self.location!r}")
                self._root = h5py.File(self.location, "r")
            else:
                self._root = store.open_group(self.location, mode="r", storage_options=self.storage_options)
            self._pid = os.getpid()
            # a forked child has none of its parent's pool threads
            self._arrays, self._io, self._readahead, self._spare_buffers = {}, None, None, {}
        return self._root

    def _array(self, path: str) -> _CacheArray:
        """The array at ``path`` and how to read its rows (see ``_CacheArray``)."""
        root = self._open()
        if path not in self._arrays:
            array = root[path]
            if _is_hdf5_root(root):
                self._arrays[path] = _CacheArray(array, None, None, chunk_checksum=False)
            else:
                from zarr.storage import LocalStore

                decompress = _row_chunk_decompressor(array.metadata, verify=self.verify)
                store_ = array.store_path.store
                directory = (os.path.join(str(store_.root), array.path)
                             if isinstance(store_, LocalStore) and decompress is not None else None)
                checked = decompress is not None and codecs.has_chunk_checksum(array.metadata)
                self._arrays[path] = _CacheArray(array.async_array, decompress, directory, chunk_checksum=checked)
        return self._arrays[path]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_root=None, _pid=None, _arrays={}, _io=None, _readahead=None, _spare_buffers={})
        return state

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
        specs, sum_values, value_sums = [], {}, []
        for _, layer in wanted:
            layer_specs = _row_specs(layer)
            sum_values[layer.name] = self.verify and (
                self.check_values or not all(self._chunks_checked(path) for path, _, _ in layer_specs))
            specs += layer_specs
            value_sums += [sum_values[layer.name]] + [False] * (len(layer_specs) - 1)  # scales: chained below
        if shared:
            outputs = handoff.shared_tensors([(shape, dtype) for _, shape, dtype in specs])
        else:
            outputs = [torch.from_numpy(np.empty(shape, dtype)) for _, shape, dtype in specs]
        record_spec = (format.RECORDS_ARRAY, (self.manifest.records_width,), np.dtype(np.uint32))
        # a layer's checksum runs over its values, then its int8 scales: the values' sum is taken where
        # they are decompressed, the scales' (a few KB) chained to it below. The record's own chunk ends with
        # its crc32c, checked as the features' (caches written before: its status is checked below).
        record, *results = self._fetch(row, [record_spec, *specs],
                                       [torch.from_numpy(np.empty(record_spec[1], record_spec[2])), *outputs],
                                       checksums=[False, *value_sums])
        if isinstance(record, (CacheFormatError, CacheNotFoundError)):  # the cache's problem, not the sample's
            raise record
        if isinstance(record, BaseException):
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row cannot be "
                                     f"read ({type(record).__name__}: {record}); run `featcache verify --repair`"
                                     ) from record
        record = record[0].numpy()
        self._check_complete(record, key, row)
        out = {}
        for position, layer in wanted:
            stored = results.pop(0)
            qparams = results.pop(0) if layer.codec.precision == "int8" else None
            failure = next((part for part in (stored, qparams) if isinstance(part, BaseException)), None)
            if isinstance(failure, (CacheFormatError, CacheNotFoundError)):  # the cache's problem, not the sample's
                raise failure
            if failure is not None:
                raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                         f"cannot be decoded: {type(failure).__name__}: {failure}; "
                                         "run `featcache verify --repair`") from failure
            values, crc = stored
            scales, scales_crc = (None, None) if qparams is None else qparams
            # a crc32c nobody asked for means a chunk was missing (``_decompress_row_chunk``): compare it
            chunk_missing = not sum_values[layer.name] and (crc is not None or scales_crc is not None)
            if sum_values[layer.name] or chunk_missing:
                crc = crc if crc is not None else format.checksum(values.numpy())
                if scales is not None:
                    crc = format.checksum(scales.numpy(), start=crc)
                if crc != int(record[1 + position]):
                    raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                             "fails the checksum the build recorded (damaged, missing or replaced chunk); "
                                             "run `featcache verify --repair`")
            out[layer.name] = (values, scales)
        return out

    def _check_complete(self, record: np.ndarray, key: str, row: int) -> None:
        """SampleNotCachedError unless the records row says the sample is complete; CorruptSampleError when
        it holds no status featcache writes (flipped bytes)."""
        if record[0] not in format.RECORDED_STATUSES:
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row is damaged "
                                     f"(status {int(record[0])} is none featcache writes); run `featcache verify "
                                     "--repair`")
        if record[0] != format.STATUS_COMPLETE:
            deleted = self._deleted() if record[0] == format.STATUS_MISSING else None
            if deleted is not None:  # a missing chunk of a cache that is gone, not a sample not built yet
                raise deleted
            state = "was invalid (non-finite teacher output)" if record[0] == format.STATUS_INVALID else "is not written yet"
            raise SampleNotCachedError(f"sample {key!r} (row {row}) in {self.location} {state}; "
                                       "run `featcache build` again to complete the cache")

    def _deleted(self) -> CacheNotFoundError | None:
        """The error for a local cache deleted while this reader has it open (its chunks then read as not
        written), or None while its directory is there (URL caches and HDF5 exports: None)."""
        if store.is_url(self.location) or _is_hdf5(self.location) or os.path.isdir(self.location):
            return None
        return CacheNotFoundError(f"cache {self.location} no longer exists: it was deleted (or moved) while open; "
                                  "point the reader at where it is now, or build it again")

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

    def _chunks_checked(self, path: str) -> bool:
        """True when the array's chunks carry their own crc32c, which every read checks."""
        try:
            return self._array(path).chunk_checksum
        except Exception:  # noqa: BLE001 - damaged metadata: reported by the read itself
            return False

    def _fetch(self, row: int, specs: list[tuple[str, tuple[int, ...], np.dtype]], outputs: list[torch.Tensor],
               checksums: list[bool]) -> list[tuple[torch.Tensor, int | None] | BaseException]:
        """Row ``row`` of each array (path, per-row shape, dtype) read into ``outputs``, with the
        crc32c of its values where ``checksums`` says (``format.checksum`` of that array alone), or the
        exception reading it raised.

        Zarr: each chunk decompressed straight into its output (see ``_row_chunk_decompressor``); a
        local store's chunk files are read directly (``_read_chunk_file``), other stores' chunks through
        zarr's store. The chunks are read concurrently, so a cold read's I/O overlaps decompression.
        Outside DataLoader workers the chunks are decompressed and checksummed concurrently too, largest
        first (the largest decompression is the critical path); inside a worker one at a time, as they
        arrive, since the workers are the parallelism there and more decompression threads would take
        cores from the training process and the other workers. HDF5: one after the other, as h5py
        returns them.
        """
        arrays: list[_CacheArray | BaseException] = []
        for path, _, _ in specs:
            try:
                arrays.append(self._array(path))
            except KeyError as exc:  # the manifest names an array the cache lacks: the manifest's problem
                arrays.append(self._deleted() or store.array_problem(self.location, path, exc))
            except ValueError as exc:  # e.g. a path zarr refuses (a layer renamed '../x'), or damaged array metadata
                arrays.append(store.array_problem(self.location, path, exc)
                              if any(part in (".", "..") for part in path.split("/")) else exc)
            except Exception as exc:  # noqa: BLE001 - e.g. damaged array metadata, reported per layer
                arrays.append(exc)
        results: list[tuple[torch.Tensor, int | None] | BaseException | None] = [None] * len(arrays)
        if _is_hdf5_root(self._open()):
            for index, (array, output) in enumerate(zip(arrays, outputs)):
                try:
                    if isinstance(array, BaseException):
                        raise array
                    array.array.read_direct(output.numpy(), source_sel=np.s_[row])
                    results[index] = (output, format.checksum(output.numpy()) if checksums[index] else None)
                except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                    results[index] = exc
            return results
        in_worker = torch.utils.data.get_worker_info() is not None
        largest_first = sorted(range(len(arrays)), key=lambda index: -outputs[index].nbytes)
        local = [index for index in largest_first
                 if not isinstance(arrays[index], BaseException) and arrays[index].directory is not None]
        if local:
            self._fetch_local_chunks(row, [(index, arrays[index], outputs[index], checksums[index]) for index in local],
                                     in_worker, results)
        others = [index for index in largest_first if index not in local]
        if others:
            self._fetch_through_store(row, [(index, arrays[index], outputs[index], checksums[index])
                                            for index in others], in_worker, results)
        return results

    def _fetch_local_chunks(self, row: int, reads: list[tuple[int, _CacheArray, torch.Tensor, bool]],
                            in_worker: bool, results: list[Any]) -> None:
        """``_fetch`` for arrays of a local store: their chunk files read on this process's I/O threads."""
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="featcache-read")

        def read(cache_array: _CacheArray) -> tuple[np.ndarray | None, list[np.ndarray]]:
            spare = self._spare_buffers.setdefault(cache_array.directory, [])
            return _read_chunk_file(cache_array.local_chunk_path(row), spare), spare

        def finish(cache_array: _CacheArray, output: torch.Tensor, checksum: bool, raw: np.ndarray | None,
                   spare: list[np.ndarray]) -> tuple[torch.Tensor, int | None]:
            try:
                return output, _decompress_row_chunk(cache_array, raw, output.numpy(), checksum)
            finally:
                if raw is not None:
                    spare.append(raw.base)  # raw is a view of the buffer _read_chunk_file took from spare

        if in_worker:
            pending = {self._io.submit(read, cache_array): (index, cache_array, output, checksum)
                       for index, cache_array, output, checksum in reads}
            for future in concurrent.futures.as_completed(pending):
                index, cache_array, output, checksum = pending[future]
                try:
                    results[index] = finish(cache_array, output, checksum, *future.result())
                except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                    results[index] = exc
            return
        futures = [(index, self._io.submit(lambda c, o, k: finish(c, o, k, *read(c)), cache_array, output, checksum))
                   for index, cache_array, output, checksum in reads]
        for index, future in futures:
            try:
                results[index] = future.result()
            except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                results[index] = exc

    def _fetch_through_store(self, row: int, reads: list[tuple[int, _CacheArray | BaseException, torch.Tensor, bool]],
                             in_worker: bool, results: list[Any]) -> None:
        """``_fetch`` for arrays of other stores (fsspec URLs) and layouts only zarr reads: in one
        event-loop round trip, chunks fetched through zarr's store."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.buffer.cpu import NDBuffer
        from zarr.core.sync import sync

        async def read(cache_array: _CacheArray | BaseException, output: torch.Tensor, checksum: bool
                       ) -> tuple[torch.Tensor, int | None]:
            if isinstance(cache_array, BaseException):
                raise cache_array
            array, values = cache_array.array, output.numpy()
            if cache_array.decompress is None:
                await array.get_orthogonal_selection((slice(row, row + 1),), out=NDBuffer.from_numpy_array(values[None]))
                return output, format.checksum(values) if checksum else None
            raw = await (array.store_path / store.row_chunk_key(array, row)).get(prototype=default_buffer_prototype())
            raw = None if raw is None else raw.as_numpy_array()
            if in_worker or raw is None:
                return output, _decompress_row_chunk(cache_array, raw, values, checksum)
            return output, await asyncio.to_thread(_decompress_row_chunk, cache_array, raw, values, checksum)

        async def read_all() -> list[Any]:
            return await asyncio.gather(*(read(cache_array, output, checksum) for _, cache_array, output, checksum in reads),
                                        return_exceptions=True)

        for (index, *_), result in zip(reads, sync(read_all())):
            results[index] = result

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
        if not rows or _is_hdf5(self.location) or store.is_url(self.location) or not hasattr(os, "posix_fadvise"):
            return
        paths = [format.RECORDS_ARRAY] + [path for layer in self.manifest.layers if layers is None or layer.name in layers
                                          for path, _, _ in _row_specs(layer)]
        try:
            arrays = [self._array(path) for path in paths]
        except Exception:  # noqa: BLE001 - damaged metadata: the read reports it by name
            return
        if self._readahead is None:
            self._readahead = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-readahead")
        self._readahead.submit(_advise_will_need, [cache_array.local_chunk_path(row) for row in rows
                                                   if 0 <= row < len(self.row_keys)
                                                   for cache_array in arrays if cache_array.directory])

    def read(self, key: str, layers: list[str] | None = None) -> dict[str, np.ndarray]:
        """One sample's features (float32 arrays) by key; ``layers``: a subset of ``layer_names``."""
        return self.read_row(self.row_of(key), layers)

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(value) for name, value in self.read(key).items()}

    def close(self) -> None:
        if self._root is not None and hasattr(self._root, "close"):
            self._root.close()
        for pool in (self._io, self._readahead):
            if pool is not None and self._pid == os.getpid():
                pool.shutdown(wait=False)
        self._root, self._io, self._readahead = None, None, None
        self._arrays, self._spare_buffers = {}, {}


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
