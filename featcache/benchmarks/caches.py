"""Benchmark caches written with featcache's own writer, their stored bytes, and the in-memory decode rate
(the codec's own speed, the read path's yardstick)."""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featcache import codecs, format, inspection, store
from featcache.reader import FeatureCache


def fp32_bytes(manifest: format.Manifest) -> int:
    """float32 bytes of one sample over all layers."""
    return sum(int(np.prod(layer.shape)) * 4 for layer in manifest.layers)


def derived_manifest(base: format.Manifest, keys: list[str], codec: codecs.CodecSpec | None,
                     note: str) -> format.Manifest:
    """The manifest of a real build, for other keys (and optionally another codec for every layer)."""
    layers = tuple(dataclasses.replace(layer, codec=codec) for layer in base.layers) if codec else base.layers
    return dataclasses.replace(base, layers=layers, num_samples=len(keys), dataset_id=format.dataset_identity(keys),
                               created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extra={**base.extra, "bench": note})


def write_cache(path: Path, manifest: format.Manifest, keys: list[str],
                sample: Callable[[int], dict[str, np.ndarray]]) -> float:
    """Write every row with featcache's CacheWriter; seconds spent in write_sample (encode, checksum, store)."""
    from featcache.writer import CacheWriter

    writer = CacheWriter.create(str(path), manifest, keys)
    start = time.perf_counter()
    for row in range(len(keys)):
        writer.write_sample(row, sample(row))
    return time.perf_counter() - start


def stored_bytes_per_sample(path: Path, manifest: format.Manifest) -> float:
    """Mean stored bytes of one sample over every layer's arrays (int8 scales included): featcache's one
    definition, ``inspection.stored_bytes_per_sample``, over all rows."""
    arrays = [array for layer in manifest.layers for array in layer.arrays()]
    return inspection.stored_bytes_per_sample(FeatureCache(str(path)), arrays, range(manifest.num_samples)) or 0.0


def decompressor(codec: codecs.CodecSpec) -> Callable[[bytes, np.ndarray], Any]:
    """The numcodecs decoder behind a featcache codec's zarr compressor, as (chunk bytes, output) -> None."""
    import numcodecs

    if codec.compressor == "zstd":
        return numcodecs.Zstd().decode
    if codec.compressor == "lz4":
        return numcodecs.Blosc().decode

    def copy(raw: bytes, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
    return copy


def chunk_bytes(location: str, array: Any, row: int) -> bytes:
    """The stored (compressed) bytes of one sample's chunk of a local cache's array."""
    return (Path(location) / array.path / store.row_chunk_key(array, row)).read_bytes()


def compressed_payload(array: Any, chunk: bytes) -> bytes:
    """A stored chunk without the crc32c zarr appends to it (``codecs.checksummed``): what the
    compressor alone decodes."""
    return chunk[:-4] if codecs.has_chunk_checksum(array.metadata) else chunk


def in_memory_decode_rate(location: str, passes: int) -> float:
    """Samples/s of decoding the cache's stored chunk bytes, already in memory, into what the trainer's
    reader hands over: numcodecs decompress into preallocated stored-value (and int8 scale/offset)
    outputs, reused row after row (no allocation, no zarr, no file, no checksum): the codec's own
    speed. The float conversion is the training device's work."""
    group = store.open_group(location)
    manifest = FeatureCache(location).manifest
    chunks: list[list[tuple[format.LayerSpec, bytes, bytes | None]]] = []
    for row in range(manifest.num_samples):
        sample = []
        for layer in manifest.layers:
            qparams = None
            if layer.qparams_array is not None:
                array = group[layer.qparams_array.path]
                qparams = compressed_payload(array, chunk_bytes(location, array, row))
            array = group[layer.values_array.path]
            sample.append((layer, compressed_payload(array, chunk_bytes(location, array, row)), qparams))
        chunks.append(sample)
    decoders = {layer.name: decompressor(layer.codec) for layer in manifest.layers}
    outputs = {layer.name: (np.zeros(layer.shape, layer.codec.storage_dtype), np.zeros((2, layer.shape[0]), np.float32))
               for layer in manifest.layers}
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0)).tolist()
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        for row in order:
            for layer, data, qbytes in chunks[row]:
                stored, qparams = outputs[layer.name]
                decoders[layer.name](data, stored)
                if qbytes is not None:
                    qparams.reshape(-1).view(np.uint8)[:] = np.frombuffer(qbytes, np.uint8)
        rates.append(len(order) / (time.perf_counter() - start))
    return statistics.median(rates)
