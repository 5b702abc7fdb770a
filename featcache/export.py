"""``featcache export --format hdf5``: the same cache as one HDF5 file (h5py).

Same layout as the Zarr group (``keys``, ``sources``, ``features/<layer>``, ``qparams/<layer>``,
``records``, manifest as JSON in the root attribute ``featcache``), chunk = 1 sample, so
:class:`featcache.reader.FeatureCache` reads it with the same checks. Stored values are copied
unchanged (checksums stay valid); HDF5's own gzip+shuffle replaces the Zarr compressor.

An existing OUT is never replaced unless asked (``overwrite``), and a directory never is. The file
is written under a fresh temporary name beside OUT and moved into place last, so a crash leaves
no half file at OUT and nothing of anyone else's is truncated.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import tempfile

import numpy as np

from featcache import format
from featcache.errors import ConfigError
from featcache.location import is_hdf5, is_url

logger = logging.getLogger("featcache.export")

EXPORT_FORMATS = ("hdf5",)


def check_export_target(location: str, out: str, overwrite: bool = False) -> None:
    """Refuse an OUT the export must not write: not .h5/.hdf5 (the reader would not open it), a
    directory, the cache itself, or an existing file without ``overwrite``. ConfigError naming it."""
    if is_url(out):
        raise ConfigError(f"export OUT {out!r}: HDF5 exports are written to a local file path")
    if not is_hdf5(out):
        raise ConfigError(f"export OUT {out!r} must end with .h5 or .hdf5 (how the reader knows an HDF5 cache)")
    if os.path.isdir(out):
        raise ConfigError(f"export OUT {out!r} is a directory; featcache never replaces a directory: "
                          f"name a file, e.g. {os.path.join(out, 'cache.h5')}")
    if not is_url(location) and os.path.lexists(out) and os.path.exists(location) and \
            os.path.samefile(out, location):
        raise ConfigError(f"export OUT {out!r} is the cache being exported")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"export OUT {out!r} exists; featcache does not replace it unless told to (--overwrite), "
                          "or choose another name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"export OUT {out!r}: directory {parent} does not exist")


def _move_into_place(partial: str, out: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(partial, out)
        return
    try:  # a hard link fails if OUT appeared meanwhile: nothing is replaced, ever
        os.link(partial, out)
    except FileExistsError as exc:
        raise ConfigError(f"export OUT {out!r} appeared while exporting; not replaced (--overwrite to replace "
                          "it)") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(out):  # a filesystem without hard links: check, then rename
            raise ConfigError(f"export OUT {out!r} appeared while exporting; not replaced") from exc
        os.rename(partial, out)
        return
    os.unlink(partial)


def _row_dataset(h5, array: format.ArraySpec, num_samples: int, compression_level: int):
    """The HDF5 dataset of ``array``: one chunk per sample as in the Zarr cache, HDF5's gzip+shuffle."""
    return h5.create_dataset(array.path, shape=array.shape(num_samples), dtype=array.dtype, chunks=array.chunks,
                             compression="gzip", compression_opts=compression_level, shuffle=True)


def export_hdf5(location: str, out: str, storage_options=None, compression_level: int = 1, progress: bool = False,
                overwrite: bool = False) -> str:
    """Write ``out`` from the cache at ``location``; see the module docstring for what is refused."""
    import h5py

    from featcache import store
    from featcache.reader import open_cache

    out = os.fspath(out)
    check_export_target(location, out, overwrite)
    # values checked against the records too: the export copies those checksums, and HDF5 reads sum the values
    cache = open_cache(location, storage_options=storage_options, check_values=True)
    root = cache._open()
    for array in cache.manifest.arrays():
        try:  # every array the manifest names (boxes and records too), before the export file is started
            root[array.path]
        except Exception as exc:  # noqa: BLE001 - a missing array, a name zarr refuses ('../x')
            raise store.array_problem(location, array.path, exc) from exc
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)),
                                       prefix=os.path.basename(out) + ".", suffix=".partial")
    os.close(handle)
    rows = range(len(cache))
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, unit="sample", desc="featcache export")
    try:
        with h5py.File(partial, "w") as h5:
            h5.attrs["featcache"] = json.dumps(cache.manifest.to_dict())
            h5.create_dataset(format.KEYS_ARRAY, data=np.asarray(cache.row_keys, dtype=object),
                              dtype=h5py.string_dtype())
            if cache.sources is not None:
                h5.create_dataset(format.SOURCES_ARRAY, data=np.asarray(cache.sources, dtype=object),
                                  dtype=h5py.string_dtype())
            records, damaged = store.read_records(root[format.RECORDS_ARRAY])
            if damaged:  # exported as not written: the export's verify names them missing
                logger.warning("%s: the records rows of %d samples are damaged and are exported as not written: %s; "
                               "run `featcache verify --repair` on the cache and export again", location, len(damaged),
                               ", ".join(cache.row_keys[row] for row in damaged[:10]))
                records[damaged] = 0
            h5.create_dataset(format.RECORDS_ARRAY, data=records)
            targets = {}  # the arrays copied row by row below
            for layer in cache.manifest.layers:
                targets[layer.values_array.path] = _row_dataset(h5, layer.values_array, len(cache), compression_level)
                if layer.qparams_array is not None:  # int8 scales and offsets: copied whole
                    h5.create_dataset(layer.qparams_array.path, data=np.asarray(root[layer.qparams_array.path][:]))
            boxes = cache.manifest.boxes_array
            if boxes is not None:  # stored rows as they are: the records' checksums cover them
                targets[boxes.path] = _row_dataset(h5, boxes, len(cache), compression_level)
            for row in rows:
                if records[row, 0] != format.STATUS_COMPLETE:
                    continue
                for layer_name, stored in cache.read_row(row, decode=False).items():
                    targets[cache.manifest.layer(layer_name).values_array.path][row] = stored
                if boxes is not None:
                    cache.read_boxes(row)  # checked against its record first
                    targets[boxes.path][row] = np.asarray(root[boxes.path][row])
        _move_into_place(partial, out, overwrite)
    finally:
        if os.path.lexists(partial):  # ours: mkstemp made the name; gone already once moved into place
            os.unlink(partial)
    return out
