"""featcache: offline teacher-feature caching for lidar BEV detector distillation.

Public API: :func:`open_cache` / :class:`FeatureCache` to read a cache, :func:`build_cache` with
:class:`BuildOptions` to write one, :func:`verify_cache`, and the errors in :mod:`featcache.errors`.
Imports are lazy so that ``import featcache`` (and ``featcache --help``) stay instant.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_cache": "featcache.reader", "FeatureCache": "featcache.reader", "CachedTargetsDataset": "featcache.teacher.paired",
    "build_cache": "featcache.teacher.build", "BuildOptions": "featcache.teacher.options",
    "verify_cache": "featcache.verify", "Manifest": "featcache.format", "CodecSpec": "featcache.codecs",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
