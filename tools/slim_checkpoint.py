"""Keep only a checkpoint's weights (optionally as float16) for shipping a small model.

Optimizer state, message hub and history go; ``meta`` keeps the config name and the sha256 of the
full checkpoint it came from. Loading back into a float32 model casts the weights up, so a float16
copy differs from the original by float16 rounding only (relative 5e-4).

Usage: python tools/slim_checkpoint.py IN.pth OUT.pth [--fp16]
"""
from __future__ import annotations

import argparse

import torch
from mmengine.runner.checkpoint import save_checkpoint

from featcache.teacher.checkpoint import load_checkpoint_file, state_dict_of
from featcache.format import sha256_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--fp16", action="store_true", help="store floating-point weights as float16")
    args = parser.parse_args()
    checkpoint = load_checkpoint_file(args.source)
    state = state_dict_of(checkpoint, args.source)
    if args.fp16:
        for name, value in state.items():
            if torch.is_floating_point(value):
                state[name] = value.half()
    meta = {key: value for key, value in checkpoint.get("meta", {}).items() if isinstance(value, (str, int, float))}
    meta["slimmed_from_sha256"] = sha256_file(args.source)
    save_checkpoint({"meta": meta, "state_dict": state}, args.out)
    print(f"wrote {args.out} ({sum(v.numel() for v in state.values())} values, sha256 {sha256_file(args.out)})")


if __name__ == "__main__":
    main()
