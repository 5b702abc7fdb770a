"""Options that name layers: the one ``LAYER=VALUE,...`` syntax of ``--codec`` and ``--bev-layout``, and what a
layer selector names.

A selector is a layer (``pts_neck.0``), or a module the layer is an output or a part of (``pts_neck`` names
``pts_neck.0``; ``pts_bbox_head`` every head output). An option gives one value for every layer (``fp16-zstd1``)
or per selector (``pts_neck=int8-zstd3,pts_backbone=fp16-lz4``); each option parses its values itself.
"""
from __future__ import annotations

import re

from featcache.errors import ConfigError

__all__ = ["MODULE_NAME", "selects", "parse_layer_items"]

#: a dotted module name (``pts_neck``, ``pts_backbone.blocks.0``): each ``--layers`` item, a selector
MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def selects(selector: str, layer: str) -> bool:
    """Whether ``selector`` names ``layer``: the layer itself, or a module the layer is an output or a part of."""
    return layer == selector or layer.startswith(selector + ".")


def parse_layer_items(text: str | None, option: str, value: str, examples: tuple[str, str]
                      ) -> tuple[str | None, list[tuple[str, str]]]:
    """``option``'s text as (the value for every layer, or None; [(selector, value text), ...] in order); nothing
    given: (None, []). ``value`` names what the option sets (``CODEC``) and ``examples`` are a per-layer item and a
    value for every layer, for the error that refuses an item not ``LAYER=<value>`` or a selector named twice."""
    if not text or not str(text).strip():
        return None, []
    text = str(text)
    if "=" not in text:
        return text.strip(), []
    items: list[tuple[str, str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        selector, sep, given = item.partition("=")
        selector = selector.strip()
        if not sep or not selector or not MODULE_NAME.match(selector):
            raise ConfigError(f"{option} item {item!r} is not LAYER={value} (e.g. {examples[0]}); or give one "
                              f"{value.lower()} for every layer ({option} {examples[1]})")
        if selector in (named for named, _ in items):
            raise ConfigError(f"{option} names layer {selector!r} twice; give each layer once")
        items.append((selector, given.strip()))
    return None, items
