"""Save an mmdet3d config's freshly initialised (seeded) model as an mmengine checkpoint.

For smoke runs and tests of the caching path before a trained teacher exists; the features such
a teacher produces have the real shapes and data flow but carry no learned meaning.

Usage: python tools/init_checkpoint.py CONFIG OUT.pth [--seed 0]
"""
from __future__ import annotations

import argparse

import torch
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu

from featcache.teacher import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = models.build_model(models.load_config(args.config))
    save_checkpoint({"meta": {"seed": args.seed, "config": args.config, "note": "seeded initialisation, untrained"},
                     "state_dict": weights_to_cpu(model.state_dict())}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
