"""E2VPT: effective and efficient visual prompt tuning (Han et al., ICCV 2023), written from METHODS.md
section 6 (official code ChengHan111/E2VPT, CC BY-NC 4.0; none of it is copied).

(a) Visual prompts: VPT-deep, N_P per block after the prefix tokens (replaced before every block), dropout.
(b) Key-value prompts: in every block, after the qkv projection, the head split and any q/k norm, L_kv
    per-head prompts are prepended to the keys and the values: K' = [P_k ; K], V' = [P_v ; V]. Queries and the
    output length are unchanged; the prompts bypass LN1 and W_k / W_v. By default (``share_kv``, the official
    SHARE_PARAM_KV) one tensor per block serves as both P_k and P_v; init kaiming-uniform (bound
    sqrt(6 / (L_kv * d_h))), no dropout.
Trainable on ViT-B/16 with 100 classes, N_P=10, L_kv=5: 92,160 + 46,080 + 76,900 = 215,140 (unshared
261,220). (c) The pruning + rewind second stage is not implemented.

SPT initialisation (METHODS.md section 11): the visual prompts exactly as spt-deep; unshared key and value
prompts from prototypes of block i's keys (LN1(x) W_k + b_k after k-norm) and values of the frozen backbone
without prompts, each prototype a whole token's key (all heads), then split into heads. A shared K=V tensor
cannot sit in both spaces, so a token initializer needs ``e2vpt.share_kv false``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

from selfprompt.init import init_prompts
from selfprompt.init.registry import get_initializer
from selfprompt.methods import prompt
from selfprompt.methods.prompt import (
    PROMPT_SEARCH,
    PromptConfig,
    PromptedViT,
    PromptedViTConfig,
    prompt_count,
)
from selfprompt.methods.prompt_tools import (
    PromptPart,
    as_grid,
    block_inputs,
    check_attention,
    refuse_tracking,
    self_attention,
    split_heads,
)
from selfprompt.methods.registry import Method, register_method, register_settings
from selfprompt.model import residual_branches

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class E2VPTConfig(PromptedViTConfig):
    """PromptedViTConfig (deep) plus the key-value prompts' length and sharing."""

    kv_length: int = 5
    share_kv: bool = True


class E2VPT(PromptedViT):
    """A frozen timm ``VisionTransformer`` with VPT-deep visual prompts and key-value prompts in every block.

    Args: as :class:`PromptedViT` (deep) plus ``kv_length`` (L_kv >= 0; 0 is VPT-deep) and ``share_kv``.
    """

    config_class = E2VPTConfig

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        num_prompts: int = 10,
        kv_length: int = 5,
        share_kv: bool = True,
        prompt_dropout: float = 0.1,
        deep: bool = True,
        deep_layers: int | None = None,
        **common: Any,
    ) -> None:
        if not deep:
            raise ValueError("E2VPT's visual prompts are deep; deep must be True.")
        if not isinstance(kv_length, int) or kv_length < 0:
            raise ValueError(f"kv_length must be an integer >= 0, got {kv_length!r}.")
        super().__init__(
            backbone,
            num_classes,
            num_prompts=num_prompts,
            deep=True,
            deep_layers=deep_layers,
            prompt_dropout=prompt_dropout,
            **common,
        )
        self.config.kv_length, self.config.share_kv = kv_length, share_kv
        self.kv_length, self.share_kv = kv_length, share_kv
        self.kv_prompts = nn.ParameterDict()
        if kv_length:
            attn = check_attention(self.backbone.blocks[0].attn, "E2VPT")
            for block in self.backbone.blocks:
                check_attention(block.attn, "E2VPT")
            shape = (len(self.backbone.blocks), attn.num_heads, kv_length, attn.head_dim)
            for name in ("kv",) if share_kv else ("key", "value"):
                self.kv_prompts[name] = nn.Parameter(torch.empty(shape, device=self.prompts.device))
            self.reset_kv_prompts()

    def kaiming_bound(self) -> float:
        """The official key-value init: kaiming-uniform with fan_in = L_kv * d_h."""
        return math.sqrt(6.0 / (self.kv_length * self.backbone.blocks[0].attn.head_dim))

    @torch.no_grad()
    def reset_kv_prompts(self, generator: torch.Generator | None = None) -> None:
        bound = self.kaiming_bound()
        for param in self.kv_prompts.values():
            param.copy_(torch.rand(param.shape, generator=generator) * (2 * bound) - bound)

    def _kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.share_kv:
            return self.kv_prompts["kv"][index], self.kv_prompts["kv"][index]
        return self.kv_prompts["key"][index], self.kv_prompts["value"][index]

    def _block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kv = self._kv(index)
        return residual_branches(block, x, attn=lambda h: self_attention(block.attn, h, kv_prefix=kv))

    def forward_block(self, index: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not self.kv_length:
            return super().forward_block(index, block, x)
        return super().forward_block(index, partial(self._block, index, block), x)

    @torch.no_grad()
    def keys_values_by_layer(self, part: int, images: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
        """Block i's keys (``part`` 1, after k-norm) or values (2) of the frozen backbone without prompts,
        patch tokens only, heads concatenated: one ``(B, H, W, H_heads * d_h)`` grid per block."""
        grids = []
        for grid, block, x in block_inputs(self.backbone, images, num_layers):
            heads = split_heads(block.attn, block.norm1(x))[part]  # (B, H, N, d_h)
            if part == 1:
                heads = block.attn.k_norm(heads)
            tokens = heads.transpose(1, 2).flatten(2)  # (B, N, H * d_h)
            grids.append(as_grid(tokens, grid, self.num_prefix_tokens))
        return grids

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter: visual prompts, key-value prompts and head."""
        kv = {f"kv_prompts.{name}": p for name, p in self.kv_prompts.items()}
        return {**kv, **super().adapter_parameters()}


@dataclass
class E2VPTSettings:
    """E2VPT's own settings (the visual prompts' count, init and dropout are the ``prompt`` section's).

    Attributes:
        kv_length: Key-value prompts per block (L_kv; official VTAB runs 1-10); 0 turns them off.
        share_kv: One tensor as both key and value prompts (the official default); set false for SPT inits.
    """

    kv_length: int = 5
    share_kv: bool = True


register_settings("e2vpt", E2VPTSettings, "E2VPT's key-value prompts (with the prompt section).")


def _token_init(init: str | None) -> bool:
    return init is not None and get_initializer(init).needs_tokens


def _refuse_shared(init: str) -> None:
    raise ValueError(
        f"e2vpt with prompt.init={init!r}: one shared key=value prompt tensor cannot be built from both "
        f"keys and values; set e2vpt.share_kv false (separate key and value prompts)."
    )


def _check(settings: Any, cfg: Any) -> None:
    if settings.e2vpt.kv_length:
        refuse_tracking(cfg, "e2vpt with key-value prompts")
    if settings.e2vpt.share_kv and settings.e2vpt.kv_length and _token_init(settings.init):
        _refuse_shared(settings.init)


def prepare(method: Method, model: E2VPT, settings: PromptConfig, loader: DataLoader, seed: int) -> None:
    """Visual prompts as :func:`selfprompt.methods.prompt.prepare`; with a token initializer the key and
    value prompts too, from the keys and values of each block (the kaiming draw otherwise)."""
    init = method.initializer(settings.init)
    if _token_init(init) and model.kv_length and model.share_kv:
        _refuse_shared(init)
    prompt.prepare(method, model, settings, loader, seed)
    if settings.file is not None or not model.kv_length or not _token_init(init):
        return
    attn = model.backbone.blocks[0].attn
    heads, depth = attn.num_heads, len(model.backbone.blocks)
    for part, name in ((1, "key"), (2, "value")):
        view = PromptPart(
            model,
            model.kv_length,
            depth,
            embed_dim=attn.attn_dim,
            tokens_by_layer=partial(model.keys_values_by_layer, part),
        )
        values = init_prompts(
            view,
            loader,
            init,
            fraction=settings.init_fraction,
            max_images=settings.init_max_images,
            seed=seed,
        )  # (L, L_kv, H * d_h)
        values = values.reshape(depth, model.kv_length, heads, -1).transpose(1, 2)
        with torch.no_grad():
            model.kv_prompts[name].copy_(values)


def _build(backbone, num_classes, settings: Any, **common: Any) -> E2VPT:
    return E2VPT(
        backbone,
        num_classes,
        num_prompts=prompt_count(settings, 10),
        kv_length=settings.e2vpt.kv_length,
        share_kv=settings.e2vpt.share_kv,
        deep_layers=settings.deep_layers,
        prompt_dropout=settings.dropout,
        **common,
    )


register_method(
    "e2vpt",
    "E2VPT: VPT-deep visual prompts plus key-value prompts prepended to every block's keys and values",
    E2VPT,
    _build,
    settings="prompt",
    extra_settings=("e2vpt",),
    check=_check,
    default_init="xavier",
    prepare=prepare,
    search=PROMPT_SEARCH,
    order=21,
)
