"""Load OpenMMLab checkpoints safely under torch's ``weights_only`` unpickler.

torch>=2.6 loads with ``weights_only=True`` by default, which refuses every type outside its
allow-list. Real mmdet3d/mmengine checkpoints hold numpy scalars, dtypes and arrays (in ``meta``
and in the message hub) and mmengine's ``HistoryBuffer``; mmengine 0.10.7's ``load_checkpoint``
then fails. featcache allows exactly those types and nothing else: a checkpoint that needs any
other global is refused with its name, never unpickled with ``weights_only=False``.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch

from featcache.errors import CheckpointError, UnsafeCheckpointError

logger = logging.getLogger("featcache.teacher.checkpoint")

# The trainer's own checkpoints (``epoch_N.pth``) are of its distiller: the detector's weights under this
# prefix, beside the distillation terms' (``terms.``) and a step counter (``steps``).
DISTILLER_STUDENT_PREFIX = "student."

#: Globals that OpenMMLab checkpoints legitimately contain (numpy data in meta and message hub
#: history). Each is data-only: reconstructing it cannot run arbitrary code.
OPENMMLAB_SAFE_GLOBALS: tuple[str, ...] = (
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Float16DType",
    "numpy.dtypes.Int64DType",
    "numpy.dtypes.Int32DType",
    "numpy.dtypes.UInt8DType",
    "numpy.dtypes.BoolDType",
    "mmengine.logging.history_buffer.HistoryBuffer",
    "collections.defaultdict",
    "builtins.set",
)


#: mmengine's HistoryBuffer pickles its statistics methods as ``getattr(HistoryBuffer, 'mean')``.
#: Allowing ``builtins.getattr`` itself would let a pickle walk from any allowed object to
#: arbitrary attributes, so the name is bound to a getattr that permits exactly those lookups.
_HISTORY_BUFFER_METHODS = frozenset({"min", "max", "current", "mean"})


_NOT_ALLOWED = "is not allowed in a checkpoint"
# How torch's weights-only unpickler (and our getattr) word a refused global, as opposed to a
# file that is simply not a pickle.
_REFUSALS = ("Unsupported global", _NOT_ALLOWED)


def _restricted_getattr(obj: Any, name: str) -> Any:
    history_buffer = _resolve("mmengine.logging.history_buffer.HistoryBuffer")
    if obj is history_buffer and name in _HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) {_NOT_ALLOWED} "
                                 "(only HistoryBuffer statistics methods are)")


def _resolve(qualified_name: str) -> Any | None:
    module_name, _, attribute = qualified_name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        return None


def safe_globals(extra: Iterable[str] = ()) -> list[Any]:
    """The allow-listed globals that exist in this environment, plus ``extra`` qualified names."""
    resolved = []
    for name in (*OPENMMLAB_SAFE_GLOBALS, *extra):
        obj = _resolve(name)
        if obj is None and name in extra:
            raise CheckpointError(f"--trust-global {name!r} does not name an importable object")
        if obj is not None and obj not in resolved:
            resolved.append(obj)
    resolved.append((_restricted_getattr, "builtins.getattr"))
    return resolved


@contextlib.contextmanager
def _allowing(allowed: list[Any]) -> Iterator[None]:
    """``torch.serialization.safe_globals``, but leaving the process-wide list exactly as it was: torch's
    context manager removes its globals on exit even when they were registered before it (by
    ``allow_openmmlab_globals_for_process``), and a later plain ``torch.load`` (mmengine's resume)
    would then refuse OpenMMLab's types."""
    before = list(torch.serialization.get_safe_globals())
    added = [obj for obj in allowed if obj not in before]
    torch.serialization.add_safe_globals(added)
    try:
        yield
    finally:
        # only what this block added goes: torch registers some of its own types lazily (DTensor on
        # first use of torch.distributed.tensor), and those must stay
        remaining = [obj for obj in torch.serialization.get_safe_globals() if obj not in added]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(remaining)


@contextlib.contextmanager
def openmmlab_safe_globals(extra: Iterable[str] = ()) -> Iterator[None]:
    """Allow OpenMMLab's checkpoint types for every ``torch.load`` in the block, including
    mmengine's own (its Runner resumes with a plain ``torch.load``)."""
    with _allowing(safe_globals(extra)):
        yield


def allow_openmmlab_globals_for_process(extra: Iterable[str] = ()) -> None:
    """Register the allow-list process-wide, for code paths (mmengine's Runner.resume) that
    call ``torch.load`` outside featcache's control."""
    torch.serialization.add_safe_globals(safe_globals(extra))


def _unsafe_globals(path: str, allowed: list[Any]) -> list[str]:
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the unpickling error itself says enough
        return []
    allowed_names = {obj[1] if isinstance(obj, tuple) else f"{obj.__module__}.{obj.__qualname__}" for obj in allowed}
    return [name for name in needed if name not in allowed_names]


def load_checkpoint_file(path: str | os.PathLike, trust_globals: Iterable[str] = (),
                         map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with the weights-only unpickler and the OpenMMLab allow-list.

    Raises:
        CheckpointError: the file is missing, truncated or not a PyTorch checkpoint.
        UnsafeCheckpointError: the pickle needs types outside the allow-list (named in the message).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    extra = tuple(trust_globals)
    allowed = safe_globals(extra)
    try:
        with _allowing(allowed):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_globals(path, allowed)
        refusals = [line.strip() for line in str(exc).splitlines() if any(marker in line for marker in _REFUSALS)]
        if unsafe or refusals:
            names = ", ".join(unsafe) or "; ".join(refusals)
            raise UnsafeCheckpointError(
                f"checkpoint {path!r} references types outside featcache's allow-list: {names}. It was not "
                "unpickled. If you trust the file and the type is plain data, pass --trust-global "
                "<module.Name> for each.") from exc
        # torch's own text advises weights_only=False, which would run whatever the pickle says: only its reason
        text = str(exc)
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        reason = next((line.strip() for line in after.splitlines() if line.strip()), type(exc).__name__)
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint (torch's weights-only "
                              f"unpickler: {reason}; a plain pickle.dump, or damaged?). featcache never unpickles "
                              "with weights_only=False: save the weights with torch.save (a dict holding a "
                              "'state_dict' of tensors, as mmengine does)") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch checkpoint "
                              f"(truncated or another format): {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(checkpoint).__name__}, not a dict of weights")
    return checkpoint


def state_dict_of(checkpoint: dict[str, Any], path: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The model weights in a checkpoint dict (mmengine's ``state_dict`` / ``model`` key or bare)."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        raise CheckpointError(f"{path} has no model weights (expected a 'state_dict' of tensors)")
    weights = OrderedDict((key.removeprefix("module."), value) for key, value in checkpoint.items())
    # Per-module versions drive load-time conversions (mmdet3d permutes spconv weights saved in
    # the old layout unless the version says otherwise): keep them, with the same prefix strip.
    metadata = getattr(checkpoint, "_metadata", None)
    if metadata is not None:
        weights._metadata = OrderedDict((key.removeprefix("module."), value) for key, value in metadata.items())
    return weights


def shape_mismatches(weights: dict[str, Any], model_state: dict[str, Any]) -> tuple[list[str], str]:
    """The tensor names both hold with other shapes, and the first three of them described
    (``name: checkpoint (..), model (..)``, ``; ...`` when there are more) for an error message."""
    wrong = [(name, tuple(value.shape), tuple(model_state[name].shape)) for name, value in weights.items()
             if name in model_state and hasattr(value, "shape") and tuple(value.shape) != tuple(model_state[name].shape)]
    listed = "; ".join(f"{name}: checkpoint {have}, model {want}" for name, have, want in wrong[:3])
    return [name for name, _, _ in wrong], listed + ("; ..." if len(wrong) > 3 else "")


def detector_weights(weights: "OrderedDict[str, Any]", model_state: dict[str, Any], path: str = "checkpoint"
                     ) -> "OrderedDict[str, Any]":
    """``weights``, or, when they are the trainer's distiller checkpoint (``epoch_N.pth``: ``student.*``,
    ``terms.*``, ``steps``) and ``model`` is a detector (none of its names starts with ``student.``), the
    student detector's weights alone with the prefix removed (``student.pth`` holds the same)."""
    prefix = DISTILLER_STUDENT_PREFIX
    if any(name.startswith(prefix) for name in model_state) or any(name in model_state for name in weights) \
            or not any(name.startswith(prefix) for name in weights):
        return weights
    student = OrderedDict((name[len(prefix):], value) for name, value in weights.items() if name.startswith(prefix))
    metadata = getattr(weights, "_metadata", None)
    if metadata is not None:
        student._metadata = OrderedDict(("" if name == prefix[:-1] else name[len(prefix):], value)
                                        for name, value in metadata.items()
                                        if name.startswith(prefix) or name == prefix[:-1])
    left = sorted({name.split(".")[0] for name in weights if not name.startswith(prefix)})
    logger.info("%s is a distillation checkpoint of the trainer: loading its student's weights (%s*), not its %s",
                path, prefix, ", ".join(left) or "other entries")
    return student


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True,
                 trust_globals: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint's weights into ``model`` (safely) and return the checkpoint's ``meta``.

    ``strict`` refuses missing or unexpected keys, naming them: a teacher with silently random
    layers would poison every cached feature.
    """
    checkpoint = load_checkpoint_file(path, trust_globals)
    weights = detector_weights(state_dict_of(checkpoint, os.fspath(path)), model.state_dict(), os.fspath(path))
    wrong, listed = shape_mismatches(weights, model.state_dict())
    if wrong:  # torch would raise its own size-mismatch error listing every tensor, without the file
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit the model: {len(wrong)} tensors have other "
                              f"shapes ({listed}); was it trained with another config (widths, classes)?")
    result = model.load_state_dict(weights, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} does not fit the model: missing {result.missing_keys[:8]}"
            f"{'...' if len(result.missing_keys) > 8 else ''}, unexpected {result.unexpected_keys[:8]}"
            f"{'...' if len(result.unexpected_keys) > 8 else ''}")
    meta = checkpoint.get("meta", {})
    return meta if isinstance(meta, dict) else {}
