"""A detector head's dense outputs as cache layers: the targets of response distillation.

Feature KD alone is the weakest family for lidar detectors; the strongest published results
(SparseKD, UniDistill) distil the teacher's *outputs*: its class heatmaps and regression maps.
``featcache build --head-outputs heatmap,reg,...`` records them like any hooked layer (one layer per
output module, so codecs, checksums, resume and readers treat them as features) and describes each
in the manifest (``LayerSpec.meaning``): which head and task it comes from, the class of each
heatmap channel, what each regression channel holds and in which unit, and that heatmaps are stored
as logits (sigmoid them to get scores). A student then matches classes by name, not by position.

Supported heads:

* mmdet3d's ``CenterHead`` (CenterPoint; per task a ``SeparateHead`` whose ``heatmap``, ``reg``,
  ``height``, ``dim``, ``rot``, ``vel`` modules each return one map);
* ``TransFusionHead`` (the BEVFusion teacher's ``bbox_head``, mmdet3d's ``projects/BEVFusion``): its
  dense class heatmap, the output of its ``heatmap_head`` (logits, one channel per dataset class in
  label order, before the query initialisation picks its peaks). Its box regression is per object
  query, not dense, so ``heatmap`` is the only dense output it has; its decoded boxes come with
  ``--boxes`` like any detector's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from featcache import codecs
from featcache.errors import ConfigError
from featcache.layout import CANONICAL, BevLayout

if TYPE_CHECKING:  # light at import: BuildOptions validates --head-outputs before torch is loaded
    from torch import nn

#: Everything a CenterHead task predicts densely, in the order its SeparateHead runs them.
CENTERHEAD_OUTPUTS = ("heatmap", "reg", "height", "dim", "rot", "vel")
#: The regression outputs: what a box looks like at the cell holding its centre.
REGRESSION_OUTPUTS = CENTERHEAD_OUTPUTS[1:]

#: Codec of class heatmaps unless ``--codec`` names them: the distillation terms compare sigmoid scores,
#: whose both ends matter (0.001 vs 0.01 on background, 0.9 vs 0.99 on a peak), so the scores themselves
#: are quantised, on their arcsine-root grid (``asin8``: every score within pi/1020, finer near 0 and 1).
#: float16 logits cost ~1.6 bytes a value even compressed (a seeded BEVFusion-size teacher's noise
#: heatmaps: 9% of its feature bytes), and an 8-bit affine grid over a logit range is set by its extreme
#: values. The uniform score grid (``score8``, half asin8's bytes) was the default until the quality
#: pilot: heatmap KD weights each cell by the teacher's score and ~35% of that weight sits on cells
#: scoring 0.002-0.05, where score8's 1/255 steps bias the targets; slim students trained from a score8
#: cache came out below their fp16 twins on all 3 seeds of the pilot, asin8's within seed noise
#: (QUALITY.md's heatmap codec section measures all three on every plan run). A trained head's heatmaps
#: are mostly background, which both store as runs of low codes.
HEATMAP_CODEC = codecs.CodecSpec(precision="asin8", compressor="zstd", level=3)
#: Codec of regression outputs (offsets, heights, log sizes, heading, velocity): float16, ~3 significant
#: digits on each.
HEAD_OUTPUT_CODEC = codecs.CodecSpec(precision="fp16", compressor="zstd", level=1)


#: Regression outputs are stored at box centres only (unless ``--dense-head-outputs``): the ``reg`` term reads
#: each at the cell holding a box centre (a GT box's or a cached teacher box's: CenterHead's own regression
#: loss looks there too) and a seeded BEVFusion-size CenterHead's 60 regression channels cost 56% of its
#: feature bytes dense, at fp16. Kept: the cell of every annotated box of the sample (all classes, whichever
#: the teacher detects: a student may have others) and of every teacher box the cache holds, plus the
#: neighbouring cell where a centre lies within ``CENTRE_MARGIN`` cells of a cell edge, since the trainer
#: finds the cell again through the sample's augmentation and back (float32 round trips move a centre by
#: ~1e-5 cells). Every other cell holds 0, which zstd stores in almost nothing.
CENTRE_MARGIN = 0.01
#: ``LayerSpec.meaning["cells"]`` of a regression output: where it holds the teacher's values.
CELLS_AT_CENTRES, CELLS_DENSE = "box centres", "all"


def centre_cells(centres: np.ndarray, bev_range: Sequence[float], hw: Sequence[int],
                 margin: float = CENTRE_MARGIN, layout: BevLayout = CANONICAL) -> np.ndarray:
    """(H, W) bool: the cells of an output map (stored shape ``hw`` in BEV ``layout``, covering ``bev_range``
    [x_min, y_min, x_max, y_max] metres) holding one of ``centres`` (N, 2: x, y metres), and the neighbour of
    each across an edge within ``margin`` cells. Centres off the grid mark nothing. The cell rule is the
    trainer's (``BevAlignment.teacher_cells_of``): floor of the position in cell units."""
    if not layout.is_canonical:
        return layout.from_canonical(centre_cells(centres, bev_range, layout.canonical_hw(hw), margin))
    height, width = int(hw[0]), int(hw[1])
    kept = np.zeros((height, width), dtype=bool)
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if not len(centres):
        return kept
    x_min, y_min, x_max, y_max = (float(value) for value in bev_range)
    u = (centres[:, 0] - x_min) / ((x_max - x_min) / width)
    v = (centres[:, 1] - y_min) / ((y_max - y_min) / height)
    for du in (-margin, margin):
        for dv in (-margin, margin):
            x, y = np.floor(u + du).astype(np.int64), np.floor(v + dv).astype(np.int64)
            on_grid = (x >= 0) & (x < width) & (y >= 0) & (y < height)
            kept[y[on_grid], x[on_grid]] = True
    return kept


def default_codec(kind: str) -> codecs.CodecSpec:
    """The codec a head output of ``kind`` gets unless ``--codec`` names it."""
    return HEATMAP_CODEC if kind == "heatmap" else HEAD_OUTPUT_CODEC


# what each CenterHead regression channel holds (mmdet3d's CenterHead.get_targets_single)
_CHANNELS = {
    "reg": ("offset_x", "offset_y"),  # box centre minus its cell's integer index, in output cells
    "height": ("z",),  # box gravity centre z, metres
    "rot": ("sin_yaw", "cos_yaw"),
    "vel": ("vx", "vy"),  # metres per second
}


@dataclass(frozen=True)
class HeadOutput:
    """One dense head output recorded as a cache layer (the layer is named after its module)."""

    layer: str
    kind: str  # "heatmap" or a regression output: "reg", "height", "dim", "rot", "vel"
    head: str  # the head module ("pts_bbox_head")
    head_type: str  # "CenterHead"
    task: int
    classes: tuple[str, ...]  # the task's classes (a heatmap's channels, in order)
    channels: tuple[str, ...]  # what each channel holds
    stored: str  # "logits" (apply sigmoid for scores) or "values"

    def meaning(self) -> dict[str, Any]:
        """The manifest's description of the layer (``LayerSpec.meaning``)."""
        return {"kind": self.kind, "head": self.head, "head_type": self.head_type, "task": self.task,
                "classes": list(self.classes), "channels": list(self.channels), "stored": self.stored}


def parse_head_outputs(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--head-outputs``: ``all`` or a comma list of :data:`CENTERHEAD_OUTPUTS`; the error lists them."""
    if text is None:
        return ()
    items = [part.strip() for part in (text.split(",") if isinstance(text, str) else text)]
    items = [item for item in items if item]
    if items == ["all"]:
        return CENTERHEAD_OUTPUTS
    unknown = [item for item in items if item not in CENTERHEAD_OUTPUTS]
    if unknown or not items:
        raise ConfigError(f"--head-outputs {text!r}: choose 'all' or some of {', '.join(CENTERHEAD_OUTPUTS)} "
                          f"(comma-separated){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    return tuple(dict.fromkeys(items))


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The detector's dense head: ``pts_bbox_head`` (MVX-style) or ``bbox_head`` (single-stage)."""
    for name in ("pts_bbox_head", "bbox_head"):
        head = getattr(model, name, None)
        if head is not None:
            return name, head
    raise ConfigError(f"{type(model).__name__} has no pts_bbox_head or bbox_head whose outputs --head-outputs "
                      "could record")


def _out_channels(module: "nn.Module") -> int:
    """Channels a head output module produces, from its last convolution. Not ``SeparateHead.heads``:
    mmdet3d's CenterHead builds every task's SeparateHead from one ``heads`` dict it keeps updating, so
    that dict ends up with the last task's heatmap size for all of them."""
    convolutions = [child for child in module.modules() if hasattr(child, "out_channels")]
    if not convolutions:
        raise ConfigError(f"head output module {type(module).__name__} has no convolution to read its channels from")
    return int(convolutions[-1].out_channels)


def transfusion_refusal(head_name: str, head_type: str, unsupported: Sequence[str]) -> str:
    """Why ``--head-outputs`` other than ``heatmap`` is refused for a TransFusionHead, and what works."""
    return (f"--head-outputs {','.join(unsupported)}: {head_name} ({head_type}) regresses boxes per object query, "
            "not on a dense map, so its only dense output is the class heatmap; use --head-outputs heatmap (and "
            "--boxes for its decoded predictions). What distils such a teacher's responses: `featcache train --kd "
            "heatmap=10,label=1` from a cache built with --head-outputs heatmap --boxes (--kd reg needs a "
            "CenterHead's dense regression outputs)")


def config_head(cfg: Any) -> tuple[str, str] | None:
    """``(module name, type name)`` of the dense head a detector config's ``model`` declares
    (``pts_bbox_head`` or ``bbox_head``, as ``find_head`` looks for them), or None when it declares
    neither with a ``type``; read from the config alone, before the model is built."""
    model = cfg.get("model") if hasattr(cfg, "get") else None
    if not hasattr(model, "get"):
        return None
    for name in ("pts_bbox_head", "bbox_head"):
        head = model.get(name)
        if hasattr(head, "get") and head.get("type"):
            kind = head["type"]
            return name, kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
    return None


def _is_transfusion_type(type_name: str) -> bool:
    """``TransFusionHead`` by name, or a registered subclass of one (the config's custom_imports loaded)."""
    if type_name.rsplit(".", 1)[-1] == "TransFusionHead":
        return True
    try:
        from mmdet3d.registry import MODELS

        cls = MODELS.get(type_name)
    except Exception:  # no registry, or a type it does not know: the name is all there is
        return False
    return cls is not None and any(base.__name__ == "TransFusionHead" for base in getattr(cls, "__mro__", ()))


def check_config_head_outputs(cfg: Any, kinds: Sequence[str]) -> None:
    """Refuse, from the config alone (before its model and dataset are built), ``--head-outputs`` a
    TransFusionHead does not have (all but ``heatmap``); ``head_outputs`` checks the built head again."""
    declared = config_head(cfg) if kinds else None
    unsupported = [kind for kind in kinds if kind != "heatmap"]
    if declared and unsupported and _is_transfusion_type(declared[1]):
        raise ConfigError(transfusion_refusal(declared[0], declared[1], unsupported))


def is_transfusion_head(head: nn.Module) -> bool:
    """A TransFusion-style head: one dense ``heatmap_head`` over all classes, then object queries
    (``num_proposals``) decoded by a transformer (mmdet3d's projects/BEVFusion ``TransFusionHead``)."""
    return all(hasattr(head, name) for name in ("heatmap_head", "num_classes", "num_proposals"))


def _transfusion_outputs(head_name: str, head: nn.Module, kinds: Sequence[str],
                         class_names: Sequence[str] | None) -> list[HeadOutput]:
    unsupported = [kind for kind in kinds if kind != "heatmap"]
    if unsupported:
        raise ConfigError(transfusion_refusal(head_name, type(head).__name__, unsupported))
    out_channels = _out_channels(head.heatmap_head)
    if not class_names or len(class_names) != out_channels:
        raise ConfigError(f"--head-outputs heatmap: {head_name}.heatmap_head has {out_channels} channels, one per "
                          f"class, and the teacher's dataset names {len(class_names or ())} classes "
                          f"({', '.join(class_names or ()) or 'none'}); set the config's class_names to the "
                          "classes the head was trained on")
    return [HeadOutput(layer=f"{head_name}.heatmap_head", kind="heatmap", head=head_name, head_type=type(head).__name__,
                       task=0, classes=tuple(class_names), channels=tuple(class_names), stored="logits")]


def head_outputs(model: nn.Module, kinds: Sequence[str], class_names: Sequence[str] | None = None) -> list[HeadOutput]:
    """The layers of ``kinds`` (``parse_head_outputs``) in the detector's head, task by task.

    ``class_names``: the dataset's classes in label order, for heads that do not name their own
    (TransFusionHead; a CenterHead carries its tasks' ``class_names``). Raises ConfigError naming the
    head type when it is neither a CenterHead nor a TransFusionHead, and naming the task and the
    outputs it has when a task lacks a requested one (e.g. ``vel`` for a KITTI head)."""
    if not kinds:
        return []
    head_name, head = find_head(model)
    if is_transfusion_head(head):
        return _transfusion_outputs(head_name, head, kinds, class_names)
    if not (hasattr(head, "task_heads") and hasattr(head, "class_names")):
        raise ConfigError(f"--head-outputs: {head_name} ({type(head).__name__}) is not a CenterHead or TransFusionHead; "
                          "featcache describes the dense outputs of CenterHead (CenterPoint) and TransFusionHead "
                          "(BEVFusion) heads. Record this head's modules as plain layers "
                          "with --layers instead (their channels are then not described in the manifest)")
    outputs = []
    for task, (task_head, classes) in enumerate(zip(head.task_heads, head.class_names)):
        available = list(getattr(task_head, "heads", {}))
        for kind in kinds:
            if kind not in available:
                raise ConfigError(f"--head-outputs {kind}: task {task} ({', '.join(classes)}) of {head_name} has no "
                                  f"{kind!r} output; it has {', '.join(available)}")
            out_channels = _out_channels(getattr(task_head, kind))
            if kind == "heatmap":
                channels = tuple(classes)
            elif kind == "dim":
                channels = ("log_l", "log_w", "log_h") if getattr(head, "norm_bbox", True) else ("l", "w", "h")
            else:
                channels = _CHANNELS.get(kind, tuple(f"{kind}_{index}" for index in range(out_channels)))
            if len(channels) != out_channels:  # a head configured differently from CenterPoint's
                channels = tuple(f"{kind}_{index}" for index in range(out_channels))
            outputs.append(HeadOutput(layer=f"{head_name}.task_heads.{task}.{kind}", kind=kind, head=head_name,
                                      head_type=type(head).__name__, task=task, classes=tuple(classes),
                                      channels=channels, stored="logits" if kind == "heatmap" else "values"))
    return outputs
