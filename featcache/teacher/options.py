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
from typing import Any, Iterable, Mapping, Sequence

from featcache import codecs, format, head_layers, layout, location, selectors
from featcache.teacher import heads
from featcache.errors import ConfigError

SPLITS = ("train", "val", "test")
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|hpu|npu|meta)(:\d+)?$")
_GLOBAL = re.compile(r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*$")


def split_layer_names(text: str | Sequence[str]) -> list[str]:
    """``--layers``: comma-separated module names (``pts_backbone``, ``pts_backbone.blocks.0``)."""
    names = [name.strip() for name in text.split(",")] if isinstance(text, str) else [str(name).strip() for name in text]
    names = [name for name in names if name]
    if not names:
        raise ConfigError("--layers is empty; name at least one module, e.g. pts_middle_encoder,pts_backbone")
    bad = [name for name in names if not selectors.MODULE_NAME.match(name)]
    if bad:
        raise ConfigError(f"--layers: {', '.join(map(repr, bad))} is not a module name (dotted Python names, "
                          "e.g. pts_neck or pts_backbone.blocks.0)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--layers names a module twice: {', '.join(names)}")
    return names


def check_codec_option(text: str | None, modules: Sequence[str] | None = None, head_outputs: Sequence[str] = (),
                       head_kinds: Mapping[str, str] | None = None) -> codecs.CodecOption:
    """``--codec`` (parsed by ``codecs.CodecOption.parse``) against what the build records, as far as it is known:
    ``modules`` (the ``--layers``; None: the detector's own, known once the model is built), ``head_outputs`` (the
    ``--head-outputs`` kinds) and ``head_kinds`` (each head output layer's kind, known once the model is built).
    Each layer it names must be one of ``modules``, an output or a part of one (``pts_neck.0``), a head output
    kind (``heatmap``: every task's) or the head's module; a score codec must land on class heatmaps only
    (:func:`check_score_codecs`). ``BuildOptions.validate`` calls it before any model work, the build once more
    when the model is built; which outputs a module has is known once the teacher ran (``CodecOption.choose``)."""
    option = codecs.CodecOption.parse(text)
    named = [*modules, *(heads.HEAD_MODULES if head_outputs else ())] if modules is not None else None
    # what each codec lands on, as far as the options (and the model, once built) say: (what, head output kind or
    # None for a feature layer, codec)
    targets: list[tuple[str, str | None, codecs.CodecSpec]] = []
    if option.every is not None:
        targets.append(("every layer", None, option.every))
    for selector, codec in option.items:
        if named is not None and selector not in head_outputs and not any(_names(selector, module) for module in named):
            raise ConfigError(f"--codec names layer {selector!r}, which --layers does not record ({', '.join(named)})"
                              + (f" nor --head-outputs ({', '.join(head_outputs)})" if head_outputs else ""))
        if selector in head_outputs:
            targets.append((f"every task's {selector} output", selector, codec))
        elif head_kinds is not None:  # the model is built: which layers are head outputs, of which kind, is known
            if any(_names(selector, module) for module in modules if module not in head_kinds):
                targets.append((selector, None, codec))
            targets += [(name, kind, codec) for name, kind in head_kinds.items() if selectors.selects(selector, name)]
        elif selector in heads.HEAD_MODULES and head_outputs:  # every head output, of each kind asked for
            targets += [(f"{selector}'s {kind} outputs", kind, codec) for kind in head_outputs]
        elif not (head_outputs and any(_names(selector, head) for head in heads.HEAD_MODULES)):
            targets.append((selector, None, codec))  # a feature layer (of --layers, or of the detector's own)
        # else a part of the head (pts_bbox_head.task_heads.0.reg): its kind is known once the model is built
    check_score_codecs(text, targets)
    return option


def _names(selector: str, module: str) -> bool:
    """Whether a ``--codec`` selector names a layer of ``module``: the module itself, an output or a part of it
    (``pts_neck.0``), or a parent of it (``selectors.selects`` either way)."""
    return selectors.selects(module, selector) or selectors.selects(selector, module)


def check_score_codecs(text: str | None, targets: Iterable[tuple[str, str | None, codecs.CodecSpec]]) -> None:
    """The score codecs' rule: ``score8`` and ``asin8`` store sigmoid scores of class-heatmap logits
    (``CodecSpec.stores_scores``), which destroys any other map, so only a class heatmap may take one.
    ``targets``: ``(what, head output kind or None for a feature layer, codec)``; the error names each wrong one."""
    wrong = {what: codec for what, kind, codec in targets if codec.stores_scores and kind != "heatmap"}
    if wrong:
        precisions = "/".join(sorted({codec.precision for codec in wrong.values()}))
        raise ConfigError(f"--codec {text!r}: {precisions} stores sigmoid scores of class-heatmap logits and would "
                          f"destroy {', '.join(wrong)}; give those layers another precision (heatmaps get "
                          f"{head_layers.HEATMAP_CODEC.name} by default)")


def check_cfg_option_items(items: Iterable[str]) -> None:
    """``--cfg-options``' ``key=value`` syntax (the values are parsed by :func:`parse_cfg_options`)."""
    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cfg-options item {item!r} is not key=value")


def parse_cfg_options(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings (mmengine's ``--cfg-options`` syntax) to a dict; values are parsed
    as Python literals where possible (``1``, ``[1,2]``, ``'a'``), else kept as strings."""
    from mmengine.config import DictAction  # here, not at import: the options module stays light

    items = list(items)
    check_cfg_option_items(items)
    return {key: DictAction._parse_iterable(value) for key, _, value in (item.partition("=") for item in items)}


def check_split(split: str) -> None:
    """``--split``: one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")


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

    @classmethod
    def from_manifest(cls, manifest: format.Manifest, out: str, rows: Sequence[int], *,
                      teacher_config: str | None = None, checkpoint: str | None = None,
                      cfg_options: dict[str, Any] | None = None,
                      storage_options: dict[str, Any] | None = None) -> "BuildOptions":
        """The options that rebuild ``rows`` of the cache at ``out`` as its build made them (``verify --repair``):
        the teacher, checkpoint, layers, split, each layer's codec, boxes and head outputs its manifest records,
        ``teacher_config``, ``checkpoint`` and ``cfg_options`` given here on top."""
        checkpoint = checkpoint or manifest.extra.get("checkpoint_path")
        if not checkpoint:
            raise ConfigError("--repair needs --checkpoint (the manifest does not record one)")
        codec = ",".join(f"{layer.name}={layer.codec.name}" for layer in manifest.layers)
        # head outputs are rebuilt as head outputs, so the regression outputs are kept where the cache keeps them
        kinds = list(dict.fromkeys(layer.kind for layer in manifest.layers if layer.is_head_output))
        regression = any(kind in head_layers.REGRESSION_OUTPUTS for kind in kinds)
        return cls(
            teacher_config=teacher_config or manifest.teacher_config_path, checkpoint=checkpoint, out=out,
            layers=manifest.extra["modules"], split=manifest.split, codec=codec,
            # the build's own --cfg-options (the manifest records them), with what is given here on top
            cfg_options={**(manifest.extra.get("cfg_options") or {}), **(cfg_options or {})},
            storage_options=storage_options, rows=rows,
            boxes=manifest.boxes is not None, max_boxes=manifest.boxes.capacity if manifest.boxes else None,
            head_outputs=",".join(kinds) or None, dense_head_outputs=regression and manifest.regression_cells is None)

    def validate(self) -> location.LocationState:
        """Check every option, ``--out`` last; returns what is at ``--out``. Raises ConfigError naming
        the option, NotACacheError / CacheFormatError for an ``--out`` featcache must not touch."""
        resolve_config_path(self.teacher_config)
        if not os.path.isfile(self.checkpoint):
            kind = "is a directory, not a file" if os.path.isdir(self.checkpoint) else "does not exist"
            raise ConfigError(f"checkpoint {self.checkpoint!r} {kind}")
        modules = split_layer_names(self.layers) if self.layers is not None else None
        check_split(self.split)
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
