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

from featcache.errors import ConfigError
from featcache.head_layers import CENTERHEAD_OUTPUTS

if TYPE_CHECKING:  # light at import: BuildOptions validates --head-outputs before torch is loaded
    from torch import nn

# what each CenterHead regression channel holds (mmdet3d's CenterHead.get_targets_single)
_CHANNELS = {
    "reg": ("offset_x", "offset_y"),  # box centre minus its cell's integer index, in output cells
    "height": ("z",),  # box gravity centre z, metres
    "rot": ("sin_yaw", "cos_yaw"),
    "vel": ("vx", "vy"),  # metres per second
}


#: Where a detector keeps its dense head (MVX-style, then single-stage): the first present is its head.
HEAD_MODULES = ("pts_bbox_head", "bbox_head")


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
    for name in HEAD_MODULES:
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
    for name in HEAD_MODULES:
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
