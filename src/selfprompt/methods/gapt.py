"""GaPT: gated prompt tuning (Yoo et al., "Improving Visual Prompt Tuning for Self-supervised Vision
Transformers", ICML 2023), from docs/methods.md, GaPT (official code ryongithub/GatedPromptTuning, MIT;
none of it is copied).

One shallow prompt set enters block 0 after the prefix tokens. Around each block i = 0 .. L-2 a learnable gate
g_i = sigmoid(theta_i) mixes the block's whole update of the prompt tokens, ``g_i * p_out + (1 - g_i) * p_in``
(class and patch tokens are untouched; the last block is ungated). theta starts at ``-gate_init``, so the
prompts start almost unchanged by the blocks. Each block's attention logits are divided by a learnable
temperature tau_i (init 1, clamped in place to [0.01, 10] every forward), folded into the queries so that
SDPA keeps running. Trainable: prompts (N x D), theta (L - 1), tau (L), head: N=100 on ViT-B/16 with 100
classes -> 76,800 + 11 + 12 + 76,900 = 153,723.

SPT initialisation (docs/methods.md, SPT): the one prompt set is built from layer-0 prototypes (the patch
embedding), exactly as spt-shallow; gates and temperatures are unaffected.
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
from selfprompt.methods.prompt_tools import check_attention, refuse_tracking, self_attention
from selfprompt.methods.registry import Search, register_method, register_settings
from selfprompt.methods.settings import adapter_config, number_problem, settings_from

import torch
from torch import nn

TEMPERATURE_RANGE = (0.01, 10.0)


@dataclass
class GaPTSettings:
    """GaPT's own settings (the prompts' count, init and dropout are the ``prompt`` section's).

    Attributes:
        gate_init: The gates' logits start at -gate_init (official config default 10: g = 4.5e-5; its
            README example uses 5: g = 0.0067).
    """

    gate_init: float = 10.0

    def problems(self) -> list[str]:
        """Values that cannot run, as ``field must be ..., got ...``."""
        return number_problem("gate_init", self.gate_init, -math.inf, math.inf, "a finite number")


#: What a GaPT adapter stores: PromptedViTConfig's fields (shallow) plus GaPTSettings'.
GaPTConfig = adapter_config(GaPTSettings, PromptedViTConfig)


class GaPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with one gated shallow prompt set and per-block attention
    temperatures. Args: as :class:`PromptedViT` (shallow only; its :class:`PromptSettings` as ``prompt``)
    plus its :class:`GaPTSettings` (``settings``); ``fields`` by name go to either."""

    config_class = GaPTConfig
    prompt_defaults: ClassVar[dict[str, Any]] = {"num_prompts": 100, "dropout": 0.1}
    needs = frozenset({"prompts", "attention"})

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        settings: GaPTSettings | None = None,
        *,
        prompt: PromptSettings | None = None,
        deep: bool = False,
        **fields: Any,
    ) -> None:
        if deep or fields.get("deep_layers") is not None or getattr(prompt, "deep_layers", None) is not None:
            raise ValueError("GaPT has one shallow prompt set; drop deep / prompt.deep_layers.")
        settings = settings_from("gapt", GaPTSettings, settings, fields)
        super().__init__(backbone, num_classes, prompt, **fields)
        self.config.gate_init = settings.gate_init
        for block in self.backbone.blocks:
            check_attention(block.attn, "GaPT")
        depth = len(self.backbone.blocks)
        device = self.prompts.device
        self.gates = nn.Parameter(torch.full((depth - 1,), -float(settings.gate_init), device=device))
        self.temperatures = nn.Parameter(torch.ones(depth, device=device))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.temperatures.clamp_(*TEMPERATURE_RANGE)
        return super().forward_features(x)

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperatures[index]
        where = self._positions
        out = self.block_branches(
            index, block, x, attn=lambda h: self_attention(block.attn, h, tau, positions=where, index=index)
        )
        if index >= len(self.gates):
            return out
        p, n = self.num_prefix_tokens, self.num_prompts
        gate = torch.sigmoid(self.gates[index])
        mixed = gate * out[:, p : p + n] + (1 - gate) * x[:, p : p + n]
        return torch.cat([out[:, :p], mixed, out[:, p + n :]], dim=1)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: prompts, gates, temperatures and head."""
        return {"gates": self.gates, "temperatures": self.temperatures, **super().adapter_parameters()}


register_settings("gapt", GaPTSettings, "GaPT's gates (with the prompt section).")


def _check(settings: Any, cfg: Any) -> None:
    refuse_tracking(cfg, "gapt")
    if settings.deep_layers is not None:
        raise ValueError("gapt has one shallow prompt set; drop prompt.deep_layers.")


def _build(backbone, num_classes, settings: Any, **common: Any) -> GaPT:
    return GaPT(backbone, num_classes, settings.gapt, prompt=with_prompt_count(settings, 100), **common)


register_method(
    "gapt",
    "GaPT: one shallow prompt set whose per-block updates are gated, attention temperatures per block",
    GaPT,
    _build,
    settings="prompt",
    extra_settings=("gapt",),
    check=_check,
    default_init="xavier",
    prepare=prepare,
    order=20,
    search=Search(
        {"optim.lr": [5e-2, 1e-2, 5e-3, 1e-3]},
        "lr: the prompt methods' grid (SPT.md 4); weight_decay stays GaPT's 0 (docs/methods.md, GaPT)",
    ),
)
