"""AdaptFormer (Chen et al., NeurIPS 2022; official code ShoufaChen/AdaptFormer, MIT): a bottleneck adapter
in parallel with each block's MLP.

Per block (docs/methods.md, AdaptFormer: the official "parallel" option, no norm on the adapter input)::

    x1  = x + drop_path(ls1(attn(norm1(x))))
    out = x1 + drop_path(ls2(mlp(norm2(x1)))) + scale * up(dropout(relu(down(x1))))

The adapter reads the un-normalised residual stream ``x1``; its output is neither drop-pathed nor
layer-scaled. ``down`` (D -> b) is kaiming-uniform(a=sqrt 5) with a zero bias, ``up`` (b -> D) is all zero,
so the model starts exactly at the linear probe. The adapters live in this model (``adapters.<i>``), not in
the backbone: the block runs through :func:`~selfprompt.model.residual_branches` with timm's own attention
(fused SDPA kept), and no timm module is changed. For ``vit_base_patch16_224`` with 100 classes and b=8:
12 * (2*8*768 + 8 + 768) = 156,768 + 76,900 head = 233,668.

Defaults: bottleneck 8 and scale 1.0 are V-PETL Bench's AdaptFormer (the VTAB-1k/FGVC numbers we compare
with, trained with AdamW like every recipe here); the official code uses b=64 and a fixed scale 0.1 with
SGD at lr 0.4 on video and CIFAR/SVHN/Food-101. V-PETL also puts a trainable LayerNorm on the adapter input,
which the official code and this module do not. Dropout 0.1 on the bottleneck is the official default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from selfprompt.methods.registry import Search, register_method, register_settings, settings_builder
from selfprompt.methods.settings import (
    adapter_config,
    number_problem,
    positive_int,
    settings_from,
)
from selfprompt.model import PoolType, ViTClassifier

import torch
from torch import nn


@dataclass
class AdaptFormerSettings:
    """AdaptFormer: the parallel adapter's width, output scale and dropout.

    Attributes:
        bottleneck: Hidden width b of the adapter (V-PETL Bench: 8; the official code: 64).
        scale: Fixed multiplier s of the adapter's output (V-PETL Bench: 1.0 with AdamW; the official
            code: 0.1 with SGD).
        dropout: Dropout on the bottleneck while training (official: 0.1).
    """

    bottleneck: int = 8
    scale: float = 1.0
    dropout: float = 0.1

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        out = (
            []
            if positive_int(self.bottleneck)
            else [f"bottleneck must be an integer >= 1, got {self.bottleneck!r}"]
        )
        return out + number_problem("dropout", self.dropout, 0, 1, "in [0, 1)")


#: What an AdaptFormer adapter stores: ClassifierConfig's fields plus AdaptFormerSettings'.
AdaptFormerConfig = adapter_config(AdaptFormerSettings)


class BottleneckAdapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))``, zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float, device=None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device)
        self.up = nn.Linear(bottleneck, dim, device=device)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(torch.relu(self.down(x)))) * self.scale


class AdaptFormer(ViTClassifier):
    """A frozen timm ``VisionTransformer`` with AdaptFormer's parallel adapter in every block and a new
    linear head; only the adapters and the head train.

    Args:
        backbone, num_classes, pool, head_init_std, backbone_name: See
            :class:`~selfprompt.model.ViTClassifier`.
        settings: Its :class:`AdaptFormerSettings` (default: their defaults); ``fields`` replace single ones
            by name (``bottleneck=4``).
    """

    config_class = AdaptFormerConfig
    needs = frozenset({"branches"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: AdaptFormerSettings | None = None,
        *,
        pool: PoolType | None = None,
        head_init_std: float = 0.02,
        train_backbone: bool = False,
        backbone_name: str | None = None,
        **fields: Any,
    ) -> None:
        if train_backbone:
            raise ValueError("AdaptFormer trains its adapters only; train_backbone must be False.")
        settings = settings_from("adaptformer", AdaptFormerSettings, settings, fields, owner="AdaptFormer")
        bottleneck, scale, dropout = settings.bottleneck, float(settings.scale), settings.dropout
        super().__init__(
            backbone,
            num_classes,
            pool=pool,
            head_init_std=head_init_std,
            backbone_name=backbone_name,
            bottleneck=bottleneck,
            scale=scale,
            dropout=dropout,
        )
        kinds = {
            type(block).__name__
            for block in self.backbone.blocks
            if not isinstance(block, self.family.block_class)
        }
        if kinds:
            raise TypeError(
                f"AdaptFormer acts inside timm's {self.family.block_class.__name__}, and this backbone's "
                f"blocks are {', '.join(sorted(kinds))}."
            )
        device = next(self.backbone.parameters()).device
        self.adapters = nn.ModuleList(
            BottleneckAdapter(self.embed_dim, bottleneck, scale, dropout, device)
            for _ in self.backbone.blocks
        )

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """timm's block, plus the adapter on the residual stream after attention, added beside the MLP."""
        after_attn: list[torch.Tensor] = []

        def keep(x1: torch.Tensor) -> torch.Tensor:
            after_attn.append(x1)
            return x1

        out = self.block_branches(index, block, x, after_attn=keep)
        return out + self.adapters[index](after_attn[0])

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: every block's down and up projections and the head."""
        return {
            f"adapters.{k}": p for k, p in self.adapters.named_parameters()
        } | super().adapter_parameters()


register_settings(
    "adaptformer", AdaptFormerSettings, "AdaptFormer settings of the adaptformer method (bottleneck, scale)."
)


register_method(
    "adaptformer",
    "AdaptFormer: a bottleneck adapter beside every block's MLP; adapters and head train",
    AdaptFormer,
    settings_builder(AdaptFormer),
    settings="adaptformer",
    order=21,
    search=Search(
        {"optim.lr": [5e-3, 1e-3, 5e-4], "optim.weight_decay": [1e-4, 1e-2]},
        "centred on NOAH's and V-PETL's AdamW lr 1e-3, weight_decay 1e-4 (docs/methods.md, LoRA and "
        "AdaptFormer); the neighbours are ours",
    ),
)
