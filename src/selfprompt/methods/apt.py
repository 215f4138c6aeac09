"""APT: approximated prompt tuning (Wu et al., "Approximated Prompt Tuning for Vision-Language Pre-trained
Models", arXiv 2306.15706), written from docs/methods.md, APT (official code DoubtedSteam/APT, no licence
file; none of it is copied).

No token enters the sequence. In each prompted block l, the attention branch's output becomes

    A   = ReLU(X K_l^T),   K_l = P_l + P_l W1_l^T W2_l^T      (X = LN1(x), the attention's input; (N, M))
    out = exp(s_l) * (attn(X) + sg(max_j A_ij) * (A P_l)_i)  (row i; sg: no gradient)

with M prompts P_l (D wide), a rank-r map W2 W1 (W1 r x D, W2 D x r) and a scalar s_l; at the start W2 = 0
and s = 0 (K = P, scale 1), and with P = 0 nothing is added. The prompts are read as they are: neither the
block's qkv nor its proj touches them. Trainable: L (M D + 2 r D + 1) + head; M = 50, r = 4 on ViT-B/16
with 100 classes: 12 * 44,545 + 76,900 = 611,440.

Init: ``xavier`` draws P uniform with the official N(0, 0.02)'s std (:meth:`APT.xavier_bound`). SPT
initialisation (docs/methods.md, SPT on other methods): layer l's prompts from prototypes of LN1(x) at block l
(patch tokens of the frozen backbone without prompts), the tokens the prompts' keys are scored against; W1,
W2 and s keep their initial values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from selfprompt.methods.prompt import (
    PromptedViT,
    PromptedViTConfig,
    PromptSettings,
    prepare,
    with_prompt_count,
)
from selfprompt.methods.prompt_tools import (
    as_grid,
    check_attention,
    frozen_layers,
    refuse_block_initializer,
    refuse_tracking,
    self_attention,
)
from selfprompt.methods.registry import Search, register_method, register_settings
from selfprompt.methods.settings import adapter_config, positive_int, settings_from
from selfprompt.model import check_backbone

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02  # the prompts' random start (official code: N(0, 0.02))


@dataclass
class APTSettings:
    """APT's own settings (the prompts' count, init and dropout are the ``prompt`` section's).

    Attributes:
        rank: r, the rank of the map W2 W1 that turns the prompts into their keys (official code: 4 in every
            ``approximate_prompt`` it builds).
    """

    rank: int = 4

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        if positive_int(self.rank):
            return []
        return [f"rank must be an integer >= 1, got {self.rank!r}"]


#: What an APT adapter stores: PromptedViTConfig's fields (deep) plus APTSettings'.
APTConfig = adapter_config(APTSettings, PromptedViTConfig)


def prompt_keys(prompts: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``K = P + P down^T up^T`` for ``prompts`` (M, D), ``down`` (r, D) and ``up`` (D, r): (M, D)."""
    return prompts + prompts @ down.T @ up.T


def read_prompts(
    x: torch.Tensor, keys: torch.Tensor, prompts: torch.Tensor, dropout: nn.Module | None = None
) -> torch.Tensor:
    """``sg(max_j A_ij) * (A P)_i`` for the tokens ``x`` (B, N, D), with ``A = dropout(ReLU(x K^T))``:
    (B, N, D). ``keys`` and ``prompts`` are (M, D), one set for every row, or (B, M, D), each row its own (a
    multi-task server's batch; zero prompts past a row's own M add nothing)."""
    scores = F.relu(x @ keys.transpose(-2, -1))  # not .mT: ONNX's exporter lacks it
    if dropout is not None:
        scores = dropout(scores)
    gate = scores.detach().amax(dim=-1, keepdim=True)
    return (scores @ prompts) * gate


def approximated_prompts(
    x: torch.Tensor,
    prompts: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """:func:`read_prompts` of ``prompts`` with the keys :func:`prompt_keys` makes of them: (B, N, D)."""
    return read_prompts(x, prompt_keys(prompts, down, up), prompts, dropout)


class APT(PromptedViT):
    """A frozen timm ``VisionTransformer`` whose attention outputs each get the approximated effect of M
    prompts, with no token added to the sequence. Args: as :class:`PromptedViT` (deep; its
    :class:`PromptSettings` as ``prompt``; ``deep_layers``: which blocks get prompts; ``dropout`` acts on the
    scores A, as the official attention dropout) plus its :class:`APTSettings` (``settings``); ``fields`` by
    name go to either."""

    config_class = APTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 50}
    needs = frozenset({"branches", "attention"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: APTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        deep: bool = True,
        **fields: Any,
    ) -> None:
        if not deep:
            raise ValueError("APT's prompts act in every prompted block (deep); deep must be True.")
        check_backbone(backbone, self.needs, "APT")
        for block in backbone.blocks:
            check_attention(block.attn, "APT")
        settings = settings_from("apt", APTSettings, settings, fields)
        super().__init__(backbone, num_classes, prompt, deep=True, **fields)
        self.config.rank = settings.rank
        self.num_extra_tokens = 0
        layers, dim, device = self.num_prompt_layers, self.embed_dim, self.prompts.device
        # the official init: W1 ~ N(0, 1), W2 = 0, s = 0 (drawn on CPU so a seed gives one result)
        self.key_down = nn.Parameter(torch.randn(layers, settings.rank, dim).to(device))
        self.key_up = nn.Parameter(torch.zeros(layers, dim, settings.rank, device=device))
        self.scales = nn.Parameter(torch.zeros(layers, device=device))

    def xavier_bound(self) -> float:
        """The random draw's bound, 0.02 sqrt(3): uniform with the official N(0, 0.02)'s std. The added term
        grows as the cube of P's scale, so VPT's bound (0.0625 on ViT-B/16, 0.27 on a 32-wide ViT) would
        start it far above the attention's own output."""
        return INIT_STD * math.sqrt(3)

    def insert_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if index >= self.num_prompt_layers:
            return self.run_block(index, block, x)
        where = self._positions

        def attention(h: torch.Tensor) -> torch.Tensor:
            own = self_attention(block.attn, h, positions=where, index=index)
            tensors = (self.prompts[index], self.key_down[index], self.key_up[index])
            added = approximated_prompts(h, *(t.to(h.dtype) for t in tensors), self.prompt_dropout)
            return (own + added) * self.scales[index].exp().to(h.dtype)

        return self.block_branches(index, block, x, attn=attention)

    @torch.no_grad()
    def attention_terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per prompted block, what inference adds to its attention output, as a multi-task server reads
        it (:mod:`selfprompt.serving.multitask`): keys K (M, D), prompts P (M, D) and the scale exp(s)."""
        keys = [prompt_keys(*t) for t in zip(self.prompts, self.key_down, self.key_up, strict=True)]
        return list(zip(keys, self.prompts, self.scales.exp(), strict=True))

    @torch.no_grad()
    def prompt_tokens_by_layer(self, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """What SPT builds layer l's prompts from: LN1(x) at block l, patch tokens only."""
        return [
            as_grid(block.norm1(x), grid, self.num_prefix_tokens)
            for grid, block, x in frozen_layers(self.backbone, images, num_layers)
        ]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: prompts, the keys' low-rank map, the scales and the head."""
        return {
            "key_down": self.key_down,
            "key_up": self.key_up,
            "scales": self.scales,
            **super().adapter_parameters(),
        }


register_settings("apt", APTSettings, "APT's key rank (with the prompt section).")


def _check(settings: Any, cfg: Any) -> None:
    refuse_tracking(cfg, "apt (whose prompts are not in the sequence)")
    refuse_block_initializer(settings, "apt", "apt's prompts are keys scored by the block's normed tokens")


def _build(backbone, num_classes, settings: Any, **common: Any) -> APT:
    return APT(backbone, num_classes, settings.apt, prompt=with_prompt_count(settings, 50), **common)


register_method(
    "apt",
    "APT: each block's attention output gets the approximated effect of its prompts; no tokens inserted",
    APT,
    _build,
    settings="prompt",
    extra_settings=("apt",),
    check=_check,
    default_init="xavier",
    prepare=prepare,
    order=24,
    shares_backbone=True,
    search=Search(
        {"optim.lr": [5e-3, 1e-3, 5e-4, 1e-4], "optim.weight_decay": [1e-2, 1e-4]},
        "lr: around the official ViLT fine-tuning rate 5e-4 (config.py), the neighbours ours; weight_decay: "
        "the official 0.01 and the VPT family's 1e-4 (docs/methods.md, APT)",
    ),
)
