"""Trainable parameters of every registered method on ``vit_base_patch16_224`` (random weights) with 100
classes, at each method's default settings (pc: 30% of vpt-deep's kept), as the README's method table quotes
them.

    python benchmarks/trainable_parameters.py [--backbone vit_base_patch16_224] [--classes 100]
"""

from __future__ import annotations

import argparse
import copy

import selfprompt  # noqa: F401  (before timm, see README)
from selfprompt.config import TrainConfig
from selfprompt.engine.build import build_model
from selfprompt.methods import get_method, method_names
from selfprompt.methods.condensation import condense_at_random

import timm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()
    backbone = timm.create_model(args.backbone, pretrained=False, num_classes=0)
    total = sum(p.numel() for p in backbone.parameters())
    print(f"{args.backbone}, {args.classes} classes, backbone {total:,} parameters")
    print(f"{'method':14s} {'trainable':>12s} {'share':>8s}  summary")
    for name in method_names():
        cfg = TrainConfig()
        cfg.model.method = get_method(name).condenses or name
        model = build_model(cfg, copy.deepcopy(backbone), args.classes)
        if get_method(name).condenses:  # pc: 30% of its source's prompts kept
            model = condense_at_random(model, 0.3)
        count = model.num_adapter_parameters()
        share = 100 * count / sum(p.numel() for p in model.parameters())
        print(f"{name:14s} {count:12,d} {share:7.3f}%  {get_method(name).summary}")


if __name__ == "__main__":
    main()
