"""``featcache export --format hdf5``: the same cache as one HDF5 file (h5py).

Same layout as the Zarr group (``keys``, ``features/<layer>``, ``qparams/<layer>``, ``records``,
manifest as JSON in the root attribute ``featcache``), chunk = 1 sample, so
:class:`featcache.reader.FeatureCache` reads it with the same checks. Stored values are copied
unchanged (checksums stay valid); HDF5's own gzip+shuffle replaces the Zarr compressor.
"""
from __future__ import annotations

import json
import os

import numpy as np

from featcache import format
from featcache.reader import open_cache

EXPORT_FORMATS = ("hdf5",)


def export_hdf5(location: str, out: str, storage_options=None, compression_level: int = 1, progress: bool = False) -> str:
    """Write ``out`` (via ``out.partial`` and a rename, so a crash leaves no half file)."""
    import h5py

    # values checked against the records too: the export copies those checksums, and HDF5 reads sum the values
    cache = open_cache(location, storage_options=storage_options, check_values=True)
    root = cache._open()
    partial = out + ".partial"
    rows = range(len(cache))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, unit="sample", desc="featcache export")
    with h5py.File(partial, "w") as h5:
        h5.attrs["featcache"] = json.dumps(cache.manifest.to_dict())
        h5.create_dataset(format.KEYS_ARRAY, data=np.asarray(cache.keys, dtype=object), dtype=h5py.string_dtype())
        records = np.asarray(root[format.RECORDS_ARRAY][:])
        h5.create_dataset(format.RECORDS_ARRAY, data=records)
        targets = {}
        for layer in cache.manifest.layers:
            shape = (len(cache), *layer.shape)
            targets[format.feature_path(layer.name)] = h5.create_dataset(
                format.feature_path(layer.name), shape=shape, dtype=layer.codec.storage_dtype,
                chunks=(1, *layer.shape), compression="gzip", compression_opts=compression_level, shuffle=True)
            if layer.codec.precision == "int8":
                h5.create_dataset(format.qparams_path(layer.name), data=np.asarray(root[format.qparams_path(layer.name)][:]))
        for row in rows:
            if records[row, 0] != format.STATUS_COMPLETE:
                continue
            for layer_name, stored in cache.read_row(row, decode=False).items():
                targets[format.feature_path(layer_name)][row] = stored
    os.replace(partial, out)
    return out
