"""The cache-side benchmark code (``featcache.benchmarks``) on the reference cache: what its figures are made of
measures what they say it does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from featcache import format, store
from featcache.benchmarks.caches import chunk_bytes, compressed_payload, decompressor, stored_bytes_per_sample
from featcache.benchmarks.reads import CacheRows, ChunkFileRows, row_loader, timed_pass
from featcache.benchmarks.storage_figures import runs_to_break_even
from featcache.reader import FeatureCache


def test_stored_bytes_per_sample_are_the_chunk_files_of_features_and_int8_scales(reference_cache):
    """The storage figure's bytes: every feature chunk plus every int8 layer's scale/offset chunk (records not)."""
    cache = FeatureCache(reference_cache)
    root = Path(reference_cache)
    folders = [root / format.feature_path(layer.name) for layer in cache.manifest.layers]
    folders += [root / format.qparams_path(layer.name) for layer in cache.manifest.layers
                if layer.codec.precision == "int8"]
    assert any(layer.codec.precision == "int8" for layer in cache.manifest.layers)  # the scale chunks count here
    on_disk = sum(path.stat().st_size for folder in folders for path in (folder / "c").rglob("*") if path.is_file())
    assert stored_bytes_per_sample(root, cache.manifest) == on_disk / len(cache)


def test_in_memory_decode_decodes_what_the_reader_returns(reference_cache):
    """The read figure's yardstick decodes the same chunk bytes into the same stored values as FeatureCache."""
    cache = FeatureCache(reference_cache)
    group = store.open_group(reference_cache)
    for row in range(len(cache)):
        stored = cache.read_row_stored(row)
        for layer in cache.manifest.layers:
            array = group[format.feature_path(layer.name)]
            out = np.zeros(layer.shape, layer.codec.storage_dtype)
            decompressor(layer.codec)(compressed_payload(array, chunk_bytes(reference_cache, array, row)), out)
            values, _ = stored[layer.name]
            assert np.array_equal(out, np.asarray(values)), (row, layer.name)


def test_cache_rows_hand_over_the_readers_tensors_and_chunk_file_rows_their_bytes(reference_cache):
    cache = FeatureCache(reference_cache)
    item = CacheRows(reference_cache)[2]
    expected = cache.read_row_tensors(2)
    assert item.keys() == expected.keys()
    for name, (values, qparams) in item.items():
        assert torch.equal(values, expected[name][0])
        assert (qparams is None) == (expected[name][1] is None)
    group = store.open_group(reference_cache)
    files = ChunkFileRows(reference_cache)[2]
    assert files == sum(len(chunk_bytes(reference_cache, array, 2)) for array in ChunkFileRows(reference_cache).arrays)
    assert files > sum(len(chunk_bytes(reference_cache, group[format.feature_path(layer.name)], 2))
                       for layer in cache.manifest.layers)  # scales and the records row too


def test_timed_pass_needs_more_samples_than_its_first_round(reference_cache):
    with pytest.raises(ValueError, match="needs more than 1 samples"):
        timed_pass(row_loader(torch.utils.data.TensorDataset(torch.zeros(1)), 0))
    assert timed_pass(row_loader(CacheRows(reference_cache), 0)) > 0


def test_runs_to_break_even():
    assert runs_to_break_even(build=10.0, forward=1.0, read=0.5, epochs=20) == "1.000"
    assert runs_to_break_even(build=10.0, forward=0.5, read=0.5, epochs=20).startswith("never")
