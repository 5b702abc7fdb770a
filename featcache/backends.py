"""Where a cache's rows come from: one small object per kind of store, behind the same few methods.

``FeatureCache`` (``featcache.reader``) asks a :class:`ChunkSource` for one row of some arrays and gets the
results back by array path; it never asks which store it reads. Three sources, as zarr keeps one store
per file behind ``zarr.abc.store``:

- :class:`LocalChunks`: a cache directory; its chunk files are read straight into reused buffers and
  decompressed into the caller's outputs (arrays laid out otherwise go through zarr, as below).
- :class:`FsspecChunks`: an fsspec URL; chunks fetched through zarr's store in one event-loop round trip.
- :class:`HDF5Rows`: an HDF5 export (``featcache export``); rows read by h5py, one after the other.

A source is opened lazily, once per process (a forked DataLoader worker gets its own handles and
threads), and pickles without them. Whether a chunk's own crc32c is checked is the reader's
``verify`` (:func:`row_chunk_decompressor`); what a read sums against the build's record is
``featcache.reader.sums_values``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np
import torch

from featcache import codecs, format, location as locations, store
from featcache.errors import CacheFormatError, CacheNotFoundError


class Read(NamedTuple):
    """One array's row to read: into ``output`` (a tensor of the row's shape and dtype), with the crc32c of its
    values (``format.checksum`` of that array alone) when ``checksum``."""

    output: torch.Tensor
    checksum: bool


def row_chunk_decompressor(metadata: Any, verify: bool = True) -> Callable[[np.ndarray, np.ndarray], None] | None:
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


class _Array(NamedTuple):
    """What reading one of a cache's arrays needs, worked out once per process (zarr re-reads
    metadata on every group lookup)."""

    array: Any  # zarr: the async handle; HDF5: the h5py dataset
    decompress: Callable[[np.ndarray, np.ndarray], None] | None  # ``row_chunk_decompressor``
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


def _decompress_row_chunk(cache_array: _Array, raw: np.ndarray | None, values: np.ndarray,
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


def _advise_will_need(paths: list[str]) -> None:
    """Have the kernel start reading these files into the page cache (``LocalChunks.prefetch``)."""
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


class ChunkSource:
    """One cache's store, read row by row; the methods ``FeatureCache`` asks of every kind.

    ``root`` is the opened group (zarr group or h5py file), once per process; ``fetch`` reads one row of
    some arrays into the caller's outputs, results by array path; ``prefetch`` hints rows coming next;
    ``chunks_checked`` says whether an array's chunks carry their own crc32c; ``deleted`` and ``damage``
    name what happened to a cache whose arrays cannot be found.
    """

    def __init__(self, location: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> None:
        self.location, self.storage_options, self.verify = location, storage_options, verify
        self._pid: int | None = None
        self._root: Any = None
        self._forget_handles()

    # -- process-local handles ----------------------------------------------------------------
    @property
    def root(self) -> Any:
        if self._root is None or self._pid != os.getpid():
            self._root = self._open_root()
            self._pid = os.getpid()
            self._forget_handles()  # a forked child has none of its parent's pool threads
        return self._root

    def _open_root(self) -> Any:
        raise NotImplementedError

    def _handles(self) -> dict[str, Any]:
        """This process's handles, fresh: none is shared with another process, or pickled."""
        return {"_arrays": {}}  # by array path: ``_Array``

    def _forget_handles(self) -> None:
        self.__dict__.update(self._handles())

    def _describe(self, array: Any) -> _Array:
        """How to read ``array`` (see ``_Array``)."""
        raise NotImplementedError

    def array(self, path: str) -> _Array:
        """The array at ``path`` and how to read its rows, worked out once per process."""
        root = self.root
        if path not in self._arrays:
            self._arrays[path] = self._describe(root[path])
        return self._arrays[path]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_root": None, "_pid": None, **self._handles()}

    def close(self) -> None:
        if self._root is not None and hasattr(self._root, "close"):
            self._root.close()
        self._root = None
        self._forget_handles()

    # -- what went wrong ----------------------------------------------------------------------
    def deleted(self) -> CacheNotFoundError | None:
        """The error for a local cache deleted while open (its chunks then read as not written), else None."""
        return None

    def damage(self) -> CacheFormatError | None:
        """The error for a cache whose manifest was lost next to recorded samples, else None."""
        return None

    # -- reading ------------------------------------------------------------------------------
    def chunks_checked(self, path: str) -> bool:
        """True when the array's chunks carry their own crc32c, which every read checks."""
        try:
            return self.array(path).chunk_checksum
        except Exception:  # noqa: BLE001 - damaged metadata: reported by the read itself
            return False

    def _arrays_of(self, paths: Iterable[str]) -> dict[str, _Array | BaseException]:
        """Each path's array, or the error opening it names (the manifest's, the cache's, or the array's own)."""
        arrays: dict[str, _Array | BaseException] = {}
        for path in paths:
            try:
                arrays[path] = self.array(path)
            except KeyError as exc:  # the manifest names an array the cache lacks: the manifest's problem
                arrays[path] = self.deleted() or store.array_problem(self.location, path, exc)
            except ValueError as exc:  # e.g. a path zarr refuses (a layer renamed '../x'), or damaged array metadata
                arrays[path] = (store.array_problem(self.location, path, exc)
                                if any(part in (".", "..") for part in path.split("/")) else exc)
            except Exception as exc:  # noqa: BLE001 - e.g. damaged array metadata, reported per layer
                arrays[path] = exc
        return arrays

    def fetch(self, row: int, reads: Mapping[str, Read]) -> dict[str, Any]:
        """Row ``row`` of each array in ``reads`` read into its output, by path: ``(output, crc32c)``, the crc32c
        None unless asked, or the exception reading it raised. A crc32c nobody asked for means the chunk did
        not exist and read as the fill value: the caller must compare it (``_decompress_row_chunk``)."""
        raise NotImplementedError

    def prefetch(self, rows: list[int], paths: list[str]) -> None:
        """Start fetching these rows of these arrays into memory and return at once (a hint: no-op here)."""


class HDF5Rows(ChunkSource):
    """An HDF5 export: rows read by h5py one after the other, straight into the outputs (``read_direct``)."""

    def _open_root(self) -> Any:
        import h5py

        if not os.path.isfile(self.location):
            raise CacheNotFoundError(f"no HDF5 cache at {self.location!r}")
        return h5py.File(self.location, "r")

    def _describe(self, array: Any) -> _Array:
        return _Array(array, None, None, chunk_checksum=False)

    def fetch(self, row: int, reads: Mapping[str, Read]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for path, array in self._arrays_of(reads).items():
            output, checksum = reads[path]
            try:
                if isinstance(array, BaseException):
                    raise array
                array.array.read_direct(output.numpy(), source_sel=np.s_[row])
                results[path] = (output, format.checksum(output.numpy()) if checksum else None)
            except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                results[path] = exc
        return results


class FsspecChunks(ChunkSource):
    """A Zarr cache behind an fsspec URL: each row's chunks fetched through zarr's store in one event-loop
    round trip, then decompressed straight into the outputs (``row_chunk_decompressor``; arrays laid out
    otherwise are read by zarr itself).

    Outside DataLoader workers the chunks are decompressed and checksummed concurrently, largest first (the
    largest decompression is the critical path); inside a worker one at a time, as they arrive, since the
    workers are the parallelism there and more decompression threads would take cores from the training
    process and the other workers."""

    def _open_root(self) -> Any:
        return store.open_group(self.location, mode="r", storage_options=self.storage_options)

    def _describe(self, array: Any) -> _Array:
        decompress = row_chunk_decompressor(array.metadata, verify=self.verify)
        checked = decompress is not None and codecs.has_chunk_checksum(array.metadata)
        return _Array(array.async_array, decompress, self._directory(array, decompress), chunk_checksum=checked)

    def _directory(self, array: Any, decompress: Callable | None) -> str | None:
        return None

    def damage(self) -> CacheFormatError | None:
        state = locations.inspect(self.location, self.storage_options)
        return CacheFormatError(state.problem) if state.kind == locations.DAMAGED else None

    def fetch(self, row: int, reads: Mapping[str, Read]) -> dict[str, Any]:
        arrays = self._arrays_of(reads)
        order = sorted(arrays, key=lambda path: -reads[path].output.nbytes)  # largest first
        return self._fetch_through_store(row, {path: (arrays[path], *reads[path]) for path in order},
                                         in_worker=torch.utils.data.get_worker_info() is not None)

    def _fetch_through_store(self, row: int, reads: dict[str, tuple[_Array | BaseException, torch.Tensor, bool]],
                             in_worker: bool) -> dict[str, Any]:
        """Rows of these arrays in one event-loop round trip, chunks fetched through zarr's store."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.buffer.cpu import NDBuffer
        from zarr.core.sync import sync

        async def read(cache_array: _Array | BaseException, output: torch.Tensor, checksum: bool
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
            return await asyncio.gather(*(read(*parts) for parts in reads.values()), return_exceptions=True)

        return dict(zip(reads, sync(read_all())))


class LocalChunks(FsspecChunks):
    """A cache directory: chunk files read directly on this process's I/O threads into reused buffers
    (``_read_chunk_file``), the cold read's I/O overlapping decompression; arrays zarr alone can read go
    through its store as for a URL."""

    _io: concurrent.futures.ThreadPoolExecutor | None  # local chunk reads
    _readahead: concurrent.futures.ThreadPoolExecutor | None  # ``prefetch``
    _spare_buffers: dict[str, list[np.ndarray]]  # chunk bytes buffers, by array directory

    def _handles(self) -> dict[str, Any]:
        return {**super()._handles(), "_io": None, "_readahead": None, "_spare_buffers": {}}

    def _directory(self, array: Any, decompress: Callable | None) -> str | None:
        from zarr.storage import LocalStore

        store_ = array.store_path.store
        return (os.path.join(str(store_.root), array.path)
                if isinstance(store_, LocalStore) and decompress is not None else None)

    def deleted(self) -> CacheNotFoundError | None:
        if os.path.isdir(self.location):
            return None
        return CacheNotFoundError(f"cache {self.location} no longer exists: it was deleted (or moved) while open; "
                                  "point the reader at where it is now, or build it again")

    def fetch(self, row: int, reads: Mapping[str, Read]) -> dict[str, Any]:
        arrays = self._arrays_of(reads)
        in_worker = torch.utils.data.get_worker_info() is not None
        order = sorted(arrays, key=lambda path: -reads[path].output.nbytes)  # largest first
        local = [path for path in order if not isinstance(arrays[path], BaseException)
                 and arrays[path].directory is not None]
        results: dict[str, Any] = {}
        if local:
            results.update(self._fetch_local_chunks(row, {path: (arrays[path], *reads[path]) for path in local},
                                                    in_worker))
        others = [path for path in order if path not in local]
        if others:
            results.update(self._fetch_through_store(row, {path: (arrays[path], *reads[path]) for path in others},
                                                     in_worker))
        return {path: results[path] for path in reads}

    def _fetch_local_chunks(self, row: int, reads: dict[str, tuple[_Array, torch.Tensor, bool]],
                            in_worker: bool) -> dict[str, Any]:
        """Rows of arrays of a local store: their chunk files read on this process's I/O threads."""
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="featcache-read")

        def read(cache_array: _Array) -> tuple[np.ndarray | None, list[np.ndarray]]:
            spare = self._spare_buffers.setdefault(cache_array.directory, [])
            return _read_chunk_file(cache_array.local_chunk_path(row), spare), spare

        def finish(cache_array: _Array, output: torch.Tensor, checksum: bool, raw: np.ndarray | None,
                   spare: list[np.ndarray]) -> tuple[torch.Tensor, int | None]:
            try:
                return output, _decompress_row_chunk(cache_array, raw, output.numpy(), checksum)
            finally:
                if raw is not None:
                    spare.append(raw.base)  # raw is a view of the buffer _read_chunk_file took from spare

        results: dict[str, Any] = {}
        if in_worker:
            pending = {self._io.submit(read, cache_array): (path, cache_array, output, checksum)
                       for path, (cache_array, output, checksum) in reads.items()}
            for future in concurrent.futures.as_completed(pending):
                path, cache_array, output, checksum = pending[future]
                try:
                    results[path] = finish(cache_array, output, checksum, *future.result())
                except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                    results[path] = exc
            return results
        futures = {path: self._io.submit(lambda c, o, k: finish(c, o, k, *read(c)), cache_array, output, checksum)
                   for path, (cache_array, output, checksum) in reads.items()}
        for path, future in futures.items():
            try:
                results[path] = future.result()
            except Exception as exc:  # noqa: BLE001 - reported per layer by the caller
                results[path] = exc
        return results

    def prefetch(self, rows: list[int], paths: list[str]) -> None:
        """``posix_fadvise(WILLNEED)`` per chunk file, issued on a background thread of this process (the
        kernel fills the page cache in the caller). Missing files are skipped; damaged metadata: nothing."""
        if not rows or not hasattr(os, "posix_fadvise"):
            return
        try:
            arrays = [self.array(path) for path in paths]
        except Exception:  # noqa: BLE001 - damaged metadata: the read reports it by name
            return
        if self._readahead is None:
            self._readahead = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-readahead")
        self._readahead.submit(_advise_will_need, [cache_array.local_chunk_path(row) for row in rows
                                                   for cache_array in arrays if cache_array.directory])

    def close(self) -> None:
        if self._pid == os.getpid():
            for pool in (self._io, self._readahead):
                if pool is not None:
                    pool.shutdown(wait=False)
        super().close()


def open_source(location: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> ChunkSource:
    """The source for ``location``: an HDF5 export's path, an fsspec URL, or a cache directory."""
    if locations.is_hdf5(location):
        return HDF5Rows(location, storage_options, verify)
    if locations.is_url(location):
        return FsspecChunks(location, storage_options, verify)
    return LocalChunks(location, storage_options, verify)
