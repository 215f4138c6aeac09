"""AdamW with SPT's three parameter groups and a per-iteration linear-warmup + cosine schedule."""

from __future__ import annotations

import math

from selfprompt.config import OptimConfig
from selfprompt.model import ViTClassifier

import torch
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: ViTClassifier, weight_decay: float, head_weight_decay: float) -> list[dict]:
    """Biases and parameters of at most one dimension: no decay; the head's weight: ``head_weight_decay``;
    everything else that trains (prompts, a training backbone's weights): ``weight_decay``."""
    groups: dict[str, list[torch.nn.Parameter]] = {"no_decay": [], "head": [], "decay": []}
    for name, param in model.adapter_parameters().items():
        if param.ndim <= 1 or name.endswith(".bias"):
            groups["no_decay"].append(param)
        elif name == "head.weight":
            groups["head"].append(param)
        else:
            groups["decay"].append(param)
    decay = {"no_decay": 0.0, "head": head_weight_decay, "decay": weight_decay}
    return [{"params": p, "weight_decay": decay[k], "name": k} for k, p in groups.items() if p]


def adamw(groups: list[dict], cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``groups`` (each with its weight decay) at ``optim.lr`` and ``optim.betas``; ``fused``:
    one kernel for all parameters (CUDA)."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def build_optimizer(model: ViTClassifier, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's :func:`param_groups`."""
    return adamw(param_groups(model, cfg.weight_decay, cfg.head_weight_decay), cfg)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, lr: float, min_lr: float
) -> LambdaLR:
    """Linear warmup from 0 over ``warmup_steps``, then half-cycle cosine from ``lr`` down to ``min_lr``."""
    floor = min_lr / lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return LambdaLR(optimizer, factor)
