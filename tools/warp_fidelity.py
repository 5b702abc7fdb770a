"""How faithful are warped cached targets? Teacher-on-augmented-input vs warped cached output.

For each sample and augmentation (rotation about z, flips, scale), the teacher runs once on the
original points (what a cache holds) and once on the augmented points (what an online teacher
would see). Each layer's BEV layout is measured on the original sample as ``featcache build``
measures it (``featcache.layout.decide_layouts``); the cached map is warped into the augmented frame
with trainer.bev_warp in that layout, as the trainer reads it, and compared with the live one (in the
same canonical rows = y frame) over the cells that have a source: cosine similarity of the flattened
maps, relative L2 error, and the occupancy agreement: the IoU of the cells where each map is active
(differs from its background; the non-zero cells of a scatter's output). Cosines of randomly
initialised features are not equivariant; the IoU does not depend on the weights. Prints a markdown
table.

Usage: python tools/warp_fidelity.py TEACHER_CONFIG CHECKPOINT [--layers pts_neck] [--samples 2]
       [--cfg-options k=v ...]
"""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch

from featcache.layout import BevLayout, activity, decide_layouts
from featcache.teacher.options import parse_cfg_options
from featcache.teacher.detector import Teacher
from trainer.bev_warp import warp_teacher_map
from trainer.grids import bev_range

AUGMENTATIONS = {
    "none": dict(angle=0.0, flow=[]),
    "rot 5 deg": dict(angle=math.radians(5), flow=["R"]),
    "rot 22.5 deg": dict(angle=math.radians(22.5), flow=["R"]),
    "rot 90 deg": dict(angle=math.radians(90), flow=["R"]),
    "flip x": dict(angle=0.0, flow=["HF"]),
    "flip y": dict(angle=0.0, flow=["VF"]),
    "scale 1.05": dict(angle=0.0, flow=["S"], scale=1.05),
}


def augment(points: torch.Tensor, spec: dict) -> tuple[torch.Tensor, dict]:
    """Apply one augmentation to (N, F) points as mmdet3d's transforms do; return the recorded meta."""
    out = points.clone()
    c, s = math.cos(spec["angle"]), math.sin(spec["angle"])
    rot_t = torch.tensor([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    meta = {"transformation_3d_flow": spec["flow"], "pcd_rotation": rot_t,
            "pcd_scale_factor": spec.get("scale", 1.0), "pcd_trans": np.zeros(3)}
    for step in spec["flow"]:
        if step == "R":
            out[:, :3] = out[:, :3] @ rot_t
        elif step == "S":
            out[:, :3] *= spec["scale"]
        elif step == "HF":
            out[:, 1] = -out[:, 1]
        elif step == "VF":
            out[:, 0] = -out[:, 0]
    return out, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--layers", default="pts_neck")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--cfg-options", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)  # spconv CPU kernels are only repeatable on one thread
    teacher = Teacher(args.config, args.checkpoint, args.layers, cfg_options=parse_cfg_options(args.cfg_options))
    grid = bev_range(teacher.cfg.get("point_cloud_range", []), args.config)
    rows = {}
    for _, _, batch in teacher.loader(range(min(args.samples, len(teacher.keys)))):
        original = teacher.features(batch)
        found, lines, warnings = decide_layouts({name: value[0] for name, value in original.items()},
                                                batch["inputs"]["points"][0][:, :2].numpy(), grid)
        layouts = {name: BevLayout.from_dict(value) for name, value in found.items()}
        for line in lines + warnings:
            print(f"<!-- {line} -->")
        for name, spec in AUGMENTATIONS.items():
            augmented_batch = copy.deepcopy(batch)
            points, meta = augment(batch["inputs"]["points"][0], spec)
            augmented_batch["inputs"]["points"][0] = points
            live = teacher.features(augmented_batch)
            for layer, cached in original.items():
                layout = layouts[layer]
                target = torch.from_numpy(cached[0])
                hw = layout.canonical_hw(target.shape[-2:])
                warped, valid = warp_teacher_map(target, grid, hw, grid, meta, layout)
                live_map = layout.to_canonical(torch.from_numpy(live[layer][0]))
                b = live_map[:, valid].double().ravel()
                a = warped[:, valid].double().ravel()
                unwarped = layout.to_canonical(target)[:, valid].double().ravel()  # the cached map as is: the baseline
                rows.setdefault((name, layer), []).append(
                    (_cosine(a, b), float((a - b).norm() / b.norm().clamp_min(1e-12)), _cosine(unwarped, b),
                     _active_iou(warped.numpy(), live_map.numpy(), valid.numpy()), float(valid.float().mean())))
    print("| augmentation | layer | layout | cosine warped vs live | relative L2 error | cosine unwarped vs live "
          "| occupancy IoU warped vs live | valid cells |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, layer), values in rows.items():
        cos, rel, raw, iou, valid = np.mean(values, axis=0)
        print(f"| {name} | {layer} | {layouts[layer].name} | {cos:.4f} | {rel:.3f} | {raw:.4f} | {iou:.3f} | {valid:.3f} |")


def _active_iou(a: np.ndarray, b: np.ndarray, valid: np.ndarray, relative: float = 1e-4) -> float:
    """IoU over ``valid`` cells of where two (C, H, W) maps are active (``activity`` above ``relative`` of its
    largest value: interpolating a constant background leaves rounding-level activity)."""
    masks = []
    for value in (a, b):
        active = activity(value)
        masks.append((active > relative * max(float(active.max()), 1e-30)) & valid)
    union = int((masks[0] | masks[1]).sum())
    return float((masks[0] & masks[1]).sum() / union) if union else 1.0


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12))


if __name__ == "__main__":
    main()
