"""A real mmdet3d CenterPoint whose BEV maps are laid out rows = x, as BEVFusion lays out its maps.

``TransposedBEVCenterPoint`` computes exactly what CenterPoint computes, but every BEV map leaves its module
transposed (C, X, Y) and is transposed back before the next module reads it: what featcache records of the
middle encoder, backbone, neck and each head output is the untransposed teacher's map transposed, bit for
bit, while the detector's own predictions (its decoder reads untransposed maps) stay the same. With
``reverse_rows=True`` the rows also run from y_max down (a flipped-axis teacher). Imported by test configs
through ``custom_imports`` (tests/ is on sys.path in the tests, and on PYTHONPATH for their subprocesses).
"""
from __future__ import annotations

from typing import Any

import torch
from mmdet3d.models.detectors import CenterPoint
from mmdet3d.registry import MODELS


def _to_stored(value: Any, reverse_rows: bool) -> Any:
    """A canonical (..., Y, X) map (or a structure of them) as this teacher stores it."""
    if isinstance(value, torch.Tensor):
        value = value.flip(-2) if reverse_rows else value
        return value.transpose(-1, -2)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_stored(item, reverse_rows) for item in value)
    if isinstance(value, dict):
        return {key: _to_stored(item, reverse_rows) for key, item in value.items()}
    return value


def _to_canonical(value: Any, reverse_rows: bool) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.transpose(-1, -2)
        return value.flip(-2) if reverse_rows else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_canonical(item, reverse_rows) for item in value)
    if isinstance(value, dict):
        return {key: _to_canonical(item, reverse_rows) for key, item in value.items()}
    return value


@MODELS.register_module(force=True)
class TransposedBEVCenterPoint(CenterPoint):
    def __init__(self, *args: Any, reverse_rows: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reverse_rows = reverse_rows

        def stored_output(_module, _inputs, output):
            return _to_stored(output, self.reverse_rows)

        def canonical_input(_module, inputs):
            return _to_canonical(inputs, self.reverse_rows)

        def canonical_output(_module, _inputs, output):
            return _to_canonical(output, self.reverse_rows)

        chain = ["pts_middle_encoder", "pts_backbone", "pts_neck"]
        for index, name in enumerate(chain):
            module = getattr(self, name)
            if index:
                module.register_forward_pre_hook(canonical_input)
            module.register_forward_hook(stored_output)
        head = self.pts_bbox_head
        head.register_forward_pre_hook(canonical_input)
        for task_head in head.task_heads:
            for kind in task_head.heads:
                getattr(task_head, kind).register_forward_hook(stored_output)
        # the head's own decoding and loss read its outputs as CenterPoint lays them out
        head.register_forward_hook(canonical_output)
