"""Record named modules' outputs during a detector's forward pass with forward hooks.

Used to produce cache targets (``featcache build``), to run a teacher online in the trainer, and
to capture a student's features for distillation: one mechanism for all three.

Output naming: a module returning a tensor is recorded as ``<module>``; one returning a list or
tuple (SECOND's multi-scale outputs, SECONDFPN's list) as ``<module>.0``, ``<module>.1``...
Sparse outputs (spconv ``SparseConvTensor``) are densified to ``(B, C, [D,] H, W)``: every BEV
consumer needs the dense map, and at BEV resolutions the dense form compresses well.
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Sequence

import torch
from torch import nn

from featcache.errors import ConfigError
from featcache.format import layer_name


class _AllLayersRecorded(Exception):
    """Raised from the last hook to skip the rest of the forward pass (heads, NMS)."""


def find_modules(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Named submodules of ``model``; a wrong name lists the top-level names there are."""
    available = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in available:
            top = sorted({key.split(".")[0] for key in available if key})
            from featcache.teacher.models import LAYER_CONVENTIONS

            raise ConfigError(f"module {name!r} not found in {type(model).__name__}; top-level modules: {', '.join(top)} "
                              f"(the BEV layers of {LAYER_CONVENTIONS}; --layers names others)")
        found[name] = available[name]
    return found


def _densify(value: Any) -> Any:
    if hasattr(value, "dense") and hasattr(value, "features") and hasattr(value, "indices"):
        return value.dense()
    return value


def flatten_output(module_name: str, output: Any) -> dict[str, torch.Tensor]:
    """A module's output as ``{layer_name: tensor}`` (see module docstring for naming)."""
    output = _densify(output)
    if isinstance(output, torch.Tensor):
        return {module_name: output}
    if isinstance(output, (list, tuple)):
        flat = {}
        for index, item in enumerate(output):
            item = _densify(item)
            if not isinstance(item, torch.Tensor):
                raise ConfigError(f"module {module_name!r} output[{index}] is a {type(item).__name__}, not a tensor")
            flat[layer_name(module_name, index)] = item
        return flat
    raise ConfigError(f"module {module_name!r} returns a {type(output).__name__}; featcache records tensors, "
                      "lists/tuples of tensors and spconv sparse tensors")


class LayerRecorder:
    """Forward hooks on named modules; ``outputs`` maps layer names to the recorded tensors.

    Use as a context manager around a forward pass. With ``detach=True`` the recorded tensors are
    detached copies (safe against later in-place ops); with ``detach=False`` they stay in the
    autograd graph (a student's features for a distillation loss), and whatever runs after the hook
    sees the same tensors: a loss that changes one in place (CenterHead's and TransFusionHead's
    ``clip_sigmoid`` turns the heatmap logits into scores with ``sigmoid_``) changes what was recorded.
    The layers in ``clone`` are therefore recorded as differentiable copies (the values the module
    produced, gradient flowing back through the copy), and :meth:`modified` names every other recorded
    tensor changed in place since its hook ran.
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str], detach: bool = True,
                 stop_when_done: bool = False, clone: Collection[str] = ()) -> None:
        self.modules = find_modules(model, module_names)
        self.detach = detach
        self.stop_when_done = stop_when_done
        self.clone = frozenset(clone)
        self.outputs: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._seen: set[str] = set()
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            for layer, tensor in flatten_output(name, output).items():
                if self.detach:
                    tensor = tensor.detach().clone()
                elif layer in self.clone:
                    tensor = tensor.clone()
                self.outputs[layer] = tensor
                self._versions[layer] = tensor._version
            self._seen.add(name)
            if self.stop_when_done and len(self._seen) == len(self.modules):
                raise _AllLayersRecorded
        return hook

    def __enter__(self) -> "LayerRecorder":
        self.outputs, self._versions, self._seen = {}, {}, set()
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return exc_type is _AllLayersRecorded

    def missing(self) -> list[str]:
        return [name for name in self.modules if name not in self._seen]

    def modified(self) -> list[str]:
        """Recorded layers whose tensor was changed in place after its hook ran (``Tensor._version``)."""
        return [layer for layer, tensor in self.outputs.items() if tensor._version != self._versions[layer]]


@torch.no_grad()
def record_teacher(model: nn.Module, batch: dict[str, Any], module_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``model.test_step`` on a collated batch and return the named modules' outputs
    (batched, on the model's device). The forward stops once every named module has fired, so
    the rest (heads, decoding, NMS) runs only as far as a hooked module needs."""
    return _record(model, batch, module_names, predict=False)[0]


@torch.no_grad()
def record_teacher_and_predict(model: nn.Module, batch: dict[str, Any], module_names: Sequence[str]
                               ) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """``record_teacher`` plus the detector's own predictions: ``test_step`` runs to its end (decoder and
    NMS), returning one ``Det3DDataSample`` per sample with ``pred_instances_3d``."""
    return _record(model, batch, module_names, predict=True)


def _record(model: nn.Module, batch: dict[str, Any], module_names: Sequence[str], predict: bool
            ) -> tuple[dict[str, torch.Tensor], list[Any]]:
    recorder = LayerRecorder(model, module_names, detach=True, stop_when_done=not predict)
    with recorder:
        predictions = model.test_step(batch)
    if recorder.missing():
        raise ConfigError(f"modules {recorder.missing()} did not run during {type(model).__name__}'s forward; "
                          "are they used by this detector's lidar branch?")
    return recorder.outputs, (list(predictions) if predict else [])


def _tensors(value: Any, path: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor in a module's output (nested tuples, lists and dicts), with where it sits."""
    value = _densify(value)
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}[{key!r}]")


class NonFiniteWatch:
    """A forward hook noting, per sample, the NaN/Inf values in every floating tensor one module outputs
    (the detector's head, whose outputs its boxes are decoded from: a NaN score fails the decoder's
    threshold, so the boxes of a NaN head can all be finite and a class just missing). Use as a context
    manager around the forward; ``problems(batch_size)`` says what was found, per sample."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.found: list[tuple[str, torch.Tensor]] = []  # (where, non-finite count per leading index)
        self._handle: Any = None

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        tensors = [(path, tensor) for path, tensor in _tensors(output) if tensor.is_floating_point()]
        if not tensors or bool(torch.stack([torch.isfinite(tensor).all() for _, tensor in tensors]).all()):
            return  # one device sync when everything is finite
        for path, tensor in tensors:
            bad = ~torch.isfinite(tensor.detach())
            if bad.any():
                counts = bad.reshape(tensor.shape[0], -1).sum(1) if tensor.dim() else bad.reshape(1)
                self.found.append((path, counts.cpu()))

    def __enter__(self) -> "NonFiniteWatch":
        self.found = []
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def problems(self, batch_size: int) -> list[str | None]:
        """Per sample, its non-finite values by output (None: all finite). A tensor whose first dimension
        is not the batch counts against every sample."""
        problems: list[list[str]] = [[] for _ in range(batch_size)]
        for path, counts in self.found:
            per_sample = len(counts) == batch_size
            for index in range(batch_size):
                count = int(counts[index]) if per_sample else int(counts.sum())
                if count:
                    problems[index].append(f"{count} in {self.name} output{path}")
        return [f"non-finite head outputs (the boxes are decoded from them): {', '.join(found[:4])}"
                + (f" and {len(found) - 4} more" if len(found) > 4 else "") if found else None
                for found in problems]
