"""Read a feature cache: ``FeatureCache(location)[key] -> {layer: tensor}``.

Read-only, and safe in DataLoader worker processes: the store is opened lazily, once per
process, and the object pickles without its open handles. Every read checks the sample's
records row (complete?) and its checksum, so a damaged or missing chunk is an error naming the
sample and layer, never zeros or garbage handed to a trainer.

The same class reads an HDF5 export (``featcache export --format hdf5``): same layout, same checks.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any, Callable, Iterator

import numpy as np
import torch

from featcache import codecs, format, handoff, store
from featcache.errors import CacheFormatError, CacheNotFoundError, CorruptSampleError, SampleNotCachedError

HDF5_SUFFIXES = (".h5", ".hdf5")


def _is_hdf5(location: str) -> bool:
    return not store.is_url(location) and location.lower().endswith(HDF5_SUFFIXES)


def _is_hdf5_root(root: Any) -> bool:
    return type(root).__module__.startswith("h5py")


def _row_chunk_decompressor(metadata: Any) -> Callable[[np.ndarray, np.ndarray], None] | None:
    """How to decompress one chunk of a cache array straight into the caller's output, or None if the
    array is not laid out as ``featcache.format`` writes it (one chunk per row, the bytes codec in
    native order and at most one zstd/blosc compressor; then zarr's own path reads it).

    zarr's pipeline decompresses a chunk into a new buffer and then copies it into ``out``; for a
    BEVFusion-lidar row that fresh allocation and copy cost about as much again as the decompression
    (BENCHMARKS.md, read path). A chunk that decompresses to fewer bytes than the output leaves the
    rest of it as it was; the row's checksum catches that, as any other damage (and, as for any other
    damage, nothing does when the cache is opened with ``verify=False``).
    """
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, ZstdCodec

    grid = getattr(metadata, "chunk_grid", None)
    codecs_ = list(getattr(metadata, "codecs", ()))
    if tuple(getattr(grid, "chunk_shape", ())) != (1, *metadata.shape[1:]) or not codecs_:
        return None
    serializer, compressors = codecs_[0], codecs_[1:]
    native = "little" if sys.byteorder == "little" else "big"
    if not isinstance(serializer, BytesCodec) or getattr(serializer.endian, "value", native) not in (None, native):
        return None
    if not compressors:
        def copy(raw: np.ndarray, out: np.ndarray) -> None:
            out.reshape(-1).view(np.uint8)[:] = raw
        return copy
    if len(compressors) > 1 or not isinstance(compressors[0], (ZstdCodec, BloscCodec)):
        return None
    codec = numcodecs.Zstd() if isinstance(compressors[0], ZstdCodec) else numcodecs.Blosc()

    def decompress(raw: np.ndarray, out: np.ndarray) -> None:
        codec.decode(raw, out=out)
    return decompress


class FeatureCache:
    """A read-only view of one cache.

    Args:
        location: cache directory, fsspec URL, or an ``.h5`` export.
        storage_options: fsspec options for URLs (credentials, endpoint).
        verify: check each sample's checksum on read (cheap: crc32c runs at several GB/s).
    """

    def __init__(self, location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
                 verify: bool = True) -> None:
        self.location = os.fspath(location)
        self.storage_options = storage_options
        self.verify = verify
        self._pid: int | None = None
        self._root: Any = None
        # path -> (array handle, its chunk decompressor), per process: zarr re-reads metadata per lookup
        self._arrays: dict[str, tuple[Any, Callable[[np.ndarray, np.ndarray], None] | None]] = {}
        group = self._open()
        raw = group.attrs.get("featcache")
        if isinstance(raw, (str, bytes)):  # HDF5 keeps the manifest as JSON text
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise CacheFormatError(f"{self.location}: damaged manifest (the featcache attribute is not JSON: "
                                       f"{exc}); restore it from a copy of the cache, or rebuild with "
                                       "`featcache build --force`") from exc
        self.manifest = format.Manifest.from_dict(raw, where=self.location)
        keys = group[format.KEYS_ARRAY][:]
        self.keys: list[str] = [k.decode() if isinstance(k, bytes) else str(k) for k in keys]
        self._rows = {key: row for row, key in enumerate(self.keys)}

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
            self._arrays = {}
        return self._root

    def _array(self, path: str) -> tuple[Any, Callable[[np.ndarray, np.ndarray], None] | None]:
        """The array at ``path`` (zarr: its async handle) and how its chunks decompress into an output
        (``_row_chunk_decompressor``; None for HDF5 and for layouts zarr must read)."""
        root = self._open()
        if path not in self._arrays:
            array = root[path]
            self._arrays[path] = ((array, None) if _is_hdf5_root(root)
                                  else (array.async_array, _row_chunk_decompressor(array.metadata)))
        return self._arrays[path]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_root"], state["_pid"], state["_arrays"] = None, None, {}
        return state

    # -- lookup ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    @property
    def layer_names(self) -> list[str]:
        return self.manifest.layer_names

    def row_of(self, key: str) -> int:
        try:
            return self._rows[key]
        except KeyError:
            raise SampleNotCachedError(f"sample {key!r} is not in cache {self.location} "
                                       f"({len(self.keys)} samples, split {self.manifest.split!r})") from None

    def status(self) -> np.ndarray:
        """Per-row status (format.STATUS_*) of every sample."""
        return np.asarray(self._open()[format.RECORDS_ARRAY][:, 0])

    # -- reading --------------------------------------------------------------------------
    def read_row(self, row: int, layers: list[str] | None = None, decode: bool = True) -> dict[str, np.ndarray]:
        """One sample's features as float32 arrays (``decode=False``: stored values, int8 undecoded)."""
        stored = self.read_row_stored(row, layers)
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
        key = self.keys[row]
        wanted = [(position, layer) for position, layer in enumerate(self.manifest.layers)
                  if layers is None or layer.name in layers]
        specs = []
        for _, layer in wanted:
            specs.append((format.feature_path(layer.name), layer.shape, layer.codec.storage_dtype))
            if layer.codec.precision == "int8":
                specs.append((format.qparams_path(layer.name), (2, layer.shape[0]), np.dtype(np.float32)))
        if shared:
            outputs = handoff.shared_tensors([(shape, dtype) for _, shape, dtype in specs])
        else:
            outputs = [torch.from_numpy(np.empty(shape, dtype)) for _, shape, dtype in specs]
        record_spec = (format.RECORDS_ARRAY, (1 + len(self.manifest.layers),), np.dtype(np.uint32))
        record, *results = self._fetch(row, [record_spec, *specs],
                                       [torch.from_numpy(np.empty(record_spec[1], record_spec[2])), *outputs],
                                       checksums=self.verify)
        if isinstance(record, BaseException):
            raise CorruptSampleError(f"sample {key!r} (row {row}) in {self.location}: its records row cannot be "
                                     f"read ({type(record).__name__}: {record}); run `featcache verify --repair`"
                                     ) from record
        record = record[0].numpy()
        if record[0] != format.STATUS_COMPLETE:
            state = "was invalid (non-finite teacher output)" if record[0] == format.STATUS_INVALID else "is not written yet"
            raise SampleNotCachedError(f"sample {key!r} (row {row}) in {self.location} {state}; "
                                       "run `featcache build` again to complete the cache")
        out = {}
        for position, layer in wanted:
            stored = results.pop(0)
            qparams = results.pop(0) if layer.codec.precision == "int8" else None
            failure = next((part for part in (stored, qparams) if isinstance(part, BaseException)), None)
            if failure is not None:
                raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                         f"cannot be decoded: {type(failure).__name__}: {failure}; "
                                         "run `featcache verify --repair`") from failure
            values, crc = stored
            scales = None if qparams is None else qparams[0]
            if self.verify:
                if scales is not None:  # the layer's checksum runs over its values, then its scales
                    crc = format.checksum(scales.numpy(), start=crc)
                if crc != int(record[1 + position]):
                    raise CorruptSampleError(f"sample {key!r} (row {row}) layer {layer.name!r} in {self.location} "
                                             "fails its checksum (damaged or missing chunk); "
                                             "run `featcache verify --repair`")
            out[layer.name] = (values, scales)
        return out

    def _fetch(self, row: int, specs: list[tuple[str, tuple[int, ...], np.dtype]], outputs: list[torch.Tensor],
               checksums: bool) -> list[tuple[torch.Tensor, int | None] | BaseException]:
        """Row ``row`` of each array (path, per-row shape, dtype) read into ``outputs``, with its
        crc32c when ``checksums`` (``format.checksum`` of that array alone), or the exception reading
        it raised.

        Zarr: in one event-loop round trip, each chunk decompressed straight into its output (see
        ``_row_chunk_decompressor``). The arrays' chunks are read concurrently, largest first (the
        largest decompression is the critical path), so a cold read's I/O overlaps decompression.
        Outside DataLoader workers each chunk is decompressed and checksummed in a thread of its own;
        inside a worker one at a time, in the event loop's thread, since the workers are the
        parallelism there and more decompression threads would take cores from the training process
        and the other workers. HDF5: one after the other, as h5py returns them.
        """
        arrays: list[tuple[Any, Callable[[np.ndarray, np.ndarray], None] | None] | BaseException] = []
        for path, _, _ in specs:
            try:
                arrays.append(self._array(path))
            except Exception as exc:  # noqa: BLE001 - e.g. damaged array metadata, reported per layer
                arrays.append(exc)
        if _is_hdf5_root(self._open()):
            results: list[tuple[torch.Tensor, int | None] | BaseException] = []
            for array, output in zip(arrays, outputs):
                try:
                    if isinstance(array, BaseException):
                        raise array
                    dataset, _ = array
                    dataset.read_direct(output.numpy(), source_sel=np.s_[row])
                    results.append((output, format.checksum(output.numpy()) if checksums else None))
                except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                    results.append(exc)
            return results
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.buffer.cpu import NDBuffer
        from zarr.core.sync import sync

        concurrent = torch.utils.data.get_worker_info() is None

        def crc(values: np.ndarray) -> int | None:
            return format.checksum(values) if checksums else None

        def decompress_and_sum(decompress: Callable[[np.ndarray, np.ndarray], None], raw: np.ndarray,
                               values: np.ndarray) -> int | None:
            decompress(raw, values)
            return crc(values)

        async def read(handle: Any, output: torch.Tensor) -> tuple[torch.Tensor, int | None]:
            if isinstance(handle, BaseException):
                raise handle
            array, decompress = handle
            values = output.numpy()
            if decompress is None:
                await array.get_orthogonal_selection((slice(row, row + 1),),
                                                     out=NDBuffer.from_numpy_array(values[None]))
                return output, crc(values)
            key = array.metadata.encode_chunk_key((row,) + (0,) * (array.ndim - 1))
            raw = await (array.store_path / key).get(prototype=default_buffer_prototype())
            if raw is None:  # zarr's meaning of a missing chunk: the fill value (a records row not yet written)
                values[...] = array.metadata.fill_value
                return output, crc(values)
            if concurrent:
                return output, await asyncio.to_thread(decompress_and_sum, decompress, raw.as_numpy_array(), values)
            return output, decompress_and_sum(decompress, raw.as_numpy_array(), values)

        async def read_all() -> list[Any]:
            largest_first = sorted(range(len(arrays)), key=lambda index: -outputs[index].nbytes)
            done = await asyncio.gather(*(read(arrays[index], outputs[index]) for index in largest_first),
                                        return_exceptions=True)
            results = [None] * len(arrays)
            for index, result in zip(largest_first, done):
                results[index] = result
            return results

        return sync(read_all())

    def read(self, key: str, layers: list[str] | None = None) -> dict[str, np.ndarray]:
        return self.read_row(self.row_of(key), layers)

    def __getitem__(self, key: str) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(value) for name, value in self.read(key).items()}

    def close(self) -> None:
        if self._root is not None and hasattr(self._root, "close"):
            self._root.close()
        self._root = None
        self._arrays = {}


class CachedTargetsDataset(torch.utils.data.Dataset):
    """Pairs an mmdet3d dataset's items with their cached targets, by sample key (never position).

    ``dataset[i]`` is whatever the dataset's pipeline returns; the targets are those of the cache
    row whose key is ``sample_key(dataset.get_data_info(i))``. Yields ``(item, {layer: tensor})``.
    Keys are resolved up front, so a dataset sample missing from the cache is an error at
    construction, naming it, not mid-epoch.
    """

    def __init__(self, dataset, cache: FeatureCache, layers: list[str] | None = None) -> None:
        from featcache.models import dataset_keys

        self.dataset, self.cache, self.layers = dataset, cache, layers
        self.rows = [cache.row_of(key) for key in dataset_keys(dataset)]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        targets = self.cache.read_row(self.rows[index], self.layers)
        return self.dataset[index], {name: torch.from_numpy(value) for name, value in targets.items()}


def open_cache(location: str | os.PathLike, storage_options: dict[str, Any] | None = None,
               verify: bool = True) -> FeatureCache:
    """Open a cache read-only; raises CacheNotFoundError / CacheFormatError with what to do."""
    try:
        return FeatureCache(location, storage_options=storage_options, verify=verify)
    except KeyError as exc:
        raise CacheFormatError(f"{os.fspath(location)}: incomplete cache layout ({exc} missing)") from exc
