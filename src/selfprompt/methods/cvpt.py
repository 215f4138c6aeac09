"""CVPT: cross visual prompt tuning (Huang et al., arXiv 2408.14961, ICCV 2025), written from
docs/methods.md, CVPT (official code Lingyun0419/CVPT has no licence file; none of it is copied).

Prompts never enter self-attention. In each prompted block, after the self-attention branch:
``x1 = x + DP(attn(LN1 x))``; ``x2 = x1 + CA(x1, P_l)``; ``out = x2 + DP(mlp(LN2 x2))``, where CA is
cross-attention with queries from x1 (every token) and keys and values from the layer's prompts, all through
the block's own frozen ``attn.qkv`` rows (q | k | v) and ``attn.proj`` (views, no copies): no LayerNorm on
x1 or the prompts, no drop-path or layer scale on CA. The sequence length is unchanged. Prompts: (L, M, D)
with prompt dropout, xavier-uniform over the 3-D tensor (bound sqrt(6 / ((M + L) * D))). Trainable:
12 * M * D + head (M=10 on ViT-B/16, 100 classes: 169,060).

SPT initialisation (docs/methods.md, SPT): layer l's prompts from prototypes of x1 at block l, the
post-self-attention stream of the frozen backbone without prompts (patch tokens; no LayerNorm, matching
the raw prompts CA reads).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from selfprompt.methods.prompt import PromptedViT, PromptSettings, prepare, with_prompt_count
from selfprompt.methods.prompt_tools import (
    as_grid,
    check_attention,
    cross_attention,
    frozen_layers,
    refuse_block_initializer,
    refuse_tracking,
)
from selfprompt.methods.registry import Search, register_method
from selfprompt.model import check_backbone

import torch
from torch import nn


class CVPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` whose tokens cross-attend to per-block prompts after
    self-attention. Args: as :class:`PromptedViT` (deep; ``deep_layers``: which blocks get prompts)."""

    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 10, "dropout": 0.1}

    needs = frozenset({"prompts", "branches", "attention"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: PromptSettings | None = None,
        *,
        deep: bool = True,
        **fields: Any,
    ) -> None:
        if not deep:
            raise ValueError("CVPT prompts every block (deep); deep must be True.")
        check_backbone(backbone, self.needs, "CVPT")
        for block in backbone.blocks:
            check_attention(block.attn, "CVPT")
        super().__init__(backbone, num_classes, settings, deep=True, **fields)
        self.num_extra_tokens = 0

    def xavier_bound(self) -> float:
        """Xavier-uniform over the (L, M, D) tensor: fan_in = M * D, fan_out = L * D."""
        return math.sqrt(6.0 / ((self.num_prompts + self.num_prompt_layers) * self.embed_dim))

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if index >= self.num_prompt_layers:
            return self.run_block(index, block, x)
        prompts = self._layer_prompts(index, x.shape[0])
        return self.block_branches(
            index, block, x, after_attn=lambda x1: x1 + cross_attention(block.attn, x1, prompts)
        )

    @torch.no_grad()
    def prompt_tokens_by_layer(self, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """What SPT builds layer l's prompts from: x1 = x + attn(LN1 x) at block l, patch tokens only."""
        grids = []
        for grid, block, x in frozen_layers(self.backbone, images, num_layers):
            x1 = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            grids.append(as_grid(x1, grid, self.num_prefix_tokens))
        return grids


def _check(settings: Any, cfg: Any) -> None:
    refuse_tracking(cfg, "cvpt (whose prompts are not in the sequence)")
    refuse_block_initializer(settings, "cvpt", "cvpt's prompts are cross-attended after it")


def _build(backbone, num_classes, settings: Any, **common: Any) -> CVPT:
    return CVPT(backbone, num_classes, with_prompt_count(settings, 10), **common)


register_method(
    "cvpt",
    "CVPT: tokens cross-attend to per-block prompts after self-attention (shared frozen weights)",
    CVPT,
    _build,
    settings="prompt",
    check=_check,
    default_init="xavier",
    prepare=prepare,
    order=23,
    search=Search(
        {"optim.lr": [5e-3, 1e-3, 5e-4], "optim.weight_decay": [5e-2, 1e-4]},
        "centred on CVPT's own AdamW lr 1e-3, weight_decay 0.05 (docs/methods.md, CVPT); the neighbours "
        "are ours",
    ),
)
