"""``featcache build``'s options, and their validation before any model, dataset or teacher work.

Light on purpose (no torch, mmengine, mmdet3d or zarr imports): ``BuildOptions.validate`` runs in
well under a second, so a typo in an option fails at once instead of after the teacher's set-up,
and ``--out`` is checked (``featcache.location``) before anything is computed for it.
"""
from __future__ import annotations

import importlib.util
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from featcache import codecs, head_layers, layout, location
from featcache.teacher import heads
from featcache.errors import ConfigError

DEFAULT_LAYERS = ("pts_middle_encoder", "pts_backbone", "pts_neck")  # MVX-style detectors' (models.MVX_LAYERS)
# ``layers=None`` (the CLI's default): the detector's convention, once it is built (models.default_layers)
SPLITS = ("train", "val", "test")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?$")
_GLOBAL = re.compile(r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")


def split_layer_names(text: str | Sequence[str]) -> list[str]:
    """``--layers``: comma-separated module names (``pts_backbone``, ``pts_backbone.blocks.0``)."""
    names = [name.strip() for name in text.split(",")] if isinstance(text, str) else [str(name).strip() for name in text]
    names = [name for name in names if name]
    if not names:
        raise ConfigError("--layers is empty; name at least one module, e.g. pts_middle_encoder,pts_backbone")
    bad = [name for name in names if not _MODULE_NAME.match(name)]
    if bad:
        raise ConfigError(f"--layers: {', '.join(map(repr, bad))} is not a module name (dotted Python names, "
                          "e.g. pts_neck or pts_backbone.blocks.0)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--layers names a module twice: {', '.join(names)}")
    return names


def check_codec_option(text: str | None, modules: Sequence[str] | None = None,
                       head_outputs: Sequence[str] = ()) -> None:
    """``--codec``'s syntax and codec names, and that each layer it names is one of ``modules`` (the
    ``--layers``), an output of one (``pts_neck.0``), or a kind of ``head_outputs`` (``heatmap``: every
    task's); which outputs exist is known once the teacher ran (``codecs.parse_codec_option``)."""
    if modules is not None and head_outputs:
        modules = [*modules, "pts_bbox_head", "bbox_head"]  # --codec may name head outputs by module too
    if not text:
        return
    if "=" not in text:
        codecs.parse_codec(text)
        return
    items = [part.strip() for part in text.split(",") if part.strip()]
    for item in items:
        layer, sep, codec_text = item.partition("=")
        layer = layer.strip()
        if not sep or not layer or not _MODULE_NAME.match(layer):
            raise ConfigError(f"--codec item {item!r} is not LAYER=CODEC (e.g. pts_neck=int8-zstd3); give one codec "
                              "for every layer (fp16-zstd1) or per layer (pts_neck=fp32-none,pts_backbone=fp16-lz4)")
        codecs.parse_codec(codec_text)
        # the module itself, an output or a part of it (pts_neck.0), or a parent of it: codecs.selects either way
        if modules is not None and layer not in head_outputs and not any(
                codecs.selects(module, layer) or codecs.selects(layer, module) for module in modules):
            raise ConfigError(f"--codec names layer {layer!r}, which --layers does not record ({', '.join(modules)})"
                              + (f" nor --head-outputs ({', '.join(head_outputs)})" if head_outputs else ""))


def check_cfg_option_items(items: Iterable[str]) -> None:
    """``--cfg-options``' ``key=value`` syntax (the values are parsed by ``models.parse_cfg_options``)."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cfg-options item {item!r} is not key=value")


def packaged_config_dir() -> Path | None:
    """Where mmdet3d ships its configs (``mmdet3d/.mim/configs``), found without importing mmdet3d."""
    spec = importlib.util.find_spec("mmdet3d")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / ".mim" / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file path; ``mmdet3d::centerpoint/x.py`` or a bare package-relative path names
    a config shipped inside mmdet3d."""
    text = os.fspath(path)
    candidate = Path(text)
    if candidate.is_file():
        return candidate
    relative = text.split("::", 1)[1] if text.startswith("mmdet3d::") else text
    packaged_dir = packaged_config_dir()
    packaged = packaged_dir / relative if packaged_dir is not None else None
    if packaged is not None and packaged.is_file():
        return packaged
    raise ConfigError(f"config {text!r} not found (looked at {candidate.resolve()}"
                      f"{f' and {packaged}' if packaged is not None else '; mmdet3d is not installed'})")


@dataclass
class BuildOptions:
    teacher_config: str
    checkpoint: str
    out: str
    layers: Sequence[str] | str | None = None  # None: models.default_layers of the teacher
    split: str = "train"
    codec: str | None = None
    cfg_options: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    batch_size: int = 1
    num_workers: int = 1
    device: str | None = None
    storage_options: dict[str, Any] | None = None
    rows: Sequence[int] | None = None  # rebuild only these rows (verify --repair)
    writer_depth: int = 4
    trust_globals: Sequence[str] = ()
    progress: bool = True
    head_outputs: str | Sequence[str] | None = None  # --head-outputs: heatmap,reg,... or all (featcache.teacher.heads)
    boxes: bool = False  # --boxes: also the teacher's decoded predictions (featcache.boxes)
    max_boxes: int | None = None  # boxes kept per sample (None: the teacher's max_per_img / max_num)
    # --dense-head-outputs: regression outputs at every cell, not only at box centres (head_layers.centre_cells)
    dense_head_outputs: bool = False
    # --bev-layout: the BEV layout of every layer ("xy") or per layer ("pts_neck=xy,..."), where the build's own
    # measurement (featcache.layout) cannot decide or is to be overridden
    bev_layout: str | None = None

    def validate(self) -> location.LocationState:
        """Check every option, ``--out`` last; returns what is at ``--out``. Raises ConfigError naming
        the option, NotACacheError / CacheFormatError for an ``--out`` featcache must not touch."""
        resolve_config_path(self.teacher_config)
        if not os.path.isfile(self.checkpoint):
            kind = "is a directory, not a file" if os.path.isdir(self.checkpoint) else "does not exist"
            raise ConfigError(f"checkpoint {self.checkpoint!r} {kind}")
        modules = split_layer_names(self.layers) if self.layers is not None else None
        if self.split not in SPLITS:
            raise ConfigError(f"--split {self.split!r}: choose one of {', '.join(SPLITS)}")
        check_codec_option(self.codec, modules, heads.parse_head_outputs(self.head_outputs))
        if not isinstance(self.cfg_options, dict):
            raise ConfigError(f"cfg_options must be a dict of overrides, got {type(self.cfg_options).__name__}")
        if self.dense_head_outputs and not set(heads.parse_head_outputs(self.head_outputs)) & set(head_layers.REGRESSION_OUTPUTS):
            raise ConfigError("--dense-head-outputs keeps regression outputs at every cell; --head-outputs "
                              f"{self.head_outputs or '(not given)'} records none (add e.g. --head-outputs all)")
        layout.parse_layout_option(self.bev_layout)
        if self.max_boxes is not None and not self.boxes:
            raise ConfigError("--max-boxes is for --boxes (how many teacher boxes a sample keeps); add --boxes")
        for name, value, least in (("--batch-size", self.batch_size, 1), ("--num-workers", self.num_workers, 0),
                                   ("writer_depth", self.writer_depth, 1),
                                   *((("--max-boxes", self.max_boxes, 1),) if self.max_boxes is not None else ())):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
        if self.device is not None and not _DEVICE.match(str(self.device)):
            raise ConfigError(f"--device {self.device!r} is not a device name (cpu, cuda, cuda:1, ...)")
        if self.storage_options is not None and not isinstance(self.storage_options, dict):
            raise ConfigError("--storage-options must be a JSON object")
        if self.storage_options and not location.is_url(self.out):
            raise ConfigError(f"--storage-options is for URL caches (s3://...); --out {self.out} is a local path")
        bad_globals = [name for name in self.trust_globals if not _GLOBAL.match(name)]
        if bad_globals:
            raise ConfigError(f"--trust-global {bad_globals[0]!r} is not module.Name")
        if self.rows is not None and any(not isinstance(row, numbers.Integral) or row < 0 for row in self.rows):
            raise ConfigError(f"rows must be row numbers >= 0, got {list(self.rows)[:5]}")
        return location.check_build_target(self.out, self.storage_options, force=self.force)
