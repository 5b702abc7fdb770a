"""Errors raised by featcache.

Each error inherits both :class:`FeatcacheError` (catch everything featcache raises) and the
builtin that best describes it, so callers that only know the builtins still catch it. Messages
name the file, sample or option at fault and say what to do.
"""
from __future__ import annotations


class FeatcacheError(Exception):
    """Base class of every error featcache raises on purpose."""


class ConfigError(FeatcacheError, ValueError):
    """A config file, option or argument is invalid (the message names it)."""


class CheckpointError(FeatcacheError, ValueError):
    """A checkpoint cannot be read: not a checkpoint, truncated, or missing its weights."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle references a type outside featcache's allow-list."""


class CacheNotFoundError(FeatcacheError, FileNotFoundError):
    """No featcache store exists at the given location."""


class CacheFormatError(FeatcacheError, ValueError):
    """A store exists but its manifest is missing, damaged or of an unknown format version."""


class CacheMismatchError(FeatcacheError, ValueError):
    """An existing cache was built from another teacher, config, layer set or dataset."""


class SampleNotCachedError(FeatcacheError, KeyError):
    """A sample key is not in the cache, or its features are not complete yet."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SampleKeyTypeError(SampleNotCachedError, TypeError):
    """A cache was indexed with a key of the wrong type (``cache[0]`` where keys are str)."""


class UnknownLayerError(ConfigError, KeyError):
    """A layer name that the cache does not hold; the message lists the layers it does hold."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class NoBoxesError(ConfigError, KeyError):
    """The cache holds no teacher boxes (it was built without ``--boxes``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotACacheError(FeatcacheError, FileExistsError):
    """A location holds files featcache did not write; featcache refuses to write or erase there."""


class StoreAccessError(FeatcacheError, OSError):
    """A URL cache's store cannot be reached: no credentials, a closed endpoint (the message names the URL)."""


class CacheBusyError(FeatcacheError, BlockingIOError):
    """Another process is writing the cache (it holds its lock, ``featcache.lock``); nothing was touched."""


class CorruptSampleError(FeatcacheError, IOError):
    """A sample's stored bytes fail their checksum or cannot be decoded."""


class InvalidFeatureError(FeatcacheError, ValueError):
    """A teacher produced NaN/Inf (or otherwise unusable) features for a sample."""


class InputDataError(FeatcacheError, ValueError):
    """A dataset sample (lidar file, info entry) is missing or malformed."""
