"""Errors of the deployment path. Each inherits featcache's base (the CLI prints it without a
traceback) and the builtin that describes it; messages name the file or module at fault."""
from __future__ import annotations

from featcache.errors import ConfigError, FeatcacheError, InputDataError


class UnsupportedModelError(ConfigError):
    """The detector holds a module (or its config a setting) the export or the runtime does not reproduce;
    the message names the module by its path in the detector and its type."""


class ExportNotFoundError(FeatcacheError, FileNotFoundError):
    """An export directory, or a file it must hold (``model.onnx``, ``deploy.json``), does not exist."""


class StaleExportError(FeatcacheError, ValueError):
    """An export directory's files do not belong together (``model.onnx`` is not the one ``deploy.json``
    was written for), its ``deploy.json`` is of another format version, or it was exported from another
    checkpoint or config than the one it is checked against."""


class PointsError(InputDataError):
    """A scan cannot be fed to an exported model: unreadable, the wrong number of point features, or no
    point inside the model's point-cloud range."""
