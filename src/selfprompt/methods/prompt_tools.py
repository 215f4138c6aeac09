"""Shared pieces of the prompt methods that act inside attention (GaPT, E2VPT, CVPT) or fill part of their
prompts from the data (E2VPT's key/value prompts, VFPT's plain share): attention with a temperature, key/value
prompts or prompts to cross-attend to, built from the backbone family's attention steps
(:mod:`selfprompt.backbones.vit`), the frozen backbone's per-block streams, and :class:`PromptPart`, a view
:func:`init_prompts` fills.

Keys and values may be longer than the queries, and a temperature is folded into the queries so that it
keeps its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from selfprompt.backbones import attention_family, backbone_family
from selfprompt.init.registry import get_initializer

import torch
import torch.nn.functional as F
from torch import nn


def refuse_tracking(cfg: Any, method: str) -> None:
    """``track.every`` records each block's input through block pre-hooks; a method that computes a block
    from its parts (``residual_branches``) runs no hook, so its statistics would be empty."""
    if cfg.track.every:
        raise ValueError(
            f"track.every: the prompt statistics are read at each block's input, which {method} computes "
            f"inside the block; set track.every 0."
        )


def refuse_block_initializer(settings: Any, method: str, why: str) -> None:
    """Refuse ``prompt.init`` naming an initializer that builds prompts from the sequence entering each block
    (``reads_blocks``: VIPAMIN) for a method whose prompts do not enter that sequence (``why``)."""
    if settings.init is not None and get_initializer(settings.init).reads_blocks:
        raise ValueError(
            f"{method} with prompt.init={settings.init!r}: that initializer builds prompts that enter a "
            f"block's self-attention, and {why}; use xavier, sample, mean_pool, max_pool or kmeans."
        )


def refuse_trainval_source(record: dict[str, Any], cfg: Any, path: Any) -> None:
    """A record scored on a final-stage model (trained on train+val) cannot feed a tune stage: its val
    images would be images the scores were learnt on."""
    if cfg.stage != "final" and record.get("stage") == "final":
        raise ValueError(
            f"{path} was scored from a model trained on train+val, so a tune stage would select on images it "
            "trained on: run --stage final, or score the source's tune stage (--stage tune)."
        )


def prompt_saliency(model: nn.Module, loader: Any, max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Per batch of ``loader``'s (images, labels), ``dL/dP * P`` for ``model.prompts`` (eval mode, the mean
    cross-entropy): summed over any set of prompt values, minus the first-order change of the loss when
    those values are zeroed."""
    was_training = model.training
    model.eval()
    device = model.prompts.device
    try:
        for batch, (images, labels) in enumerate(loader):
            if max_batches is not None and batch >= max_batches:
                break
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            (grad,) = torch.autograd.grad(loss, model.prompts)
            yield grad * model.prompts.detach()
    finally:
        model.train(was_training)


def check_attention(attn: nn.Module, method: str) -> nn.Module:
    """``attn`` when a backbone family decomposes it (:func:`selfprompt.backbones.attention_family`)."""
    if attention_family(attn) is None:
        raise TypeError(
            f"{method} computes timm's Attention itself and this backbone's attention is "
            f"{type(attn).__name__}; use a prompt method that wraps whole blocks (vpt-*, spt-*)."
        )
    return attn


def self_attention(
    attn: nn.Module,
    x: torch.Tensor,
    temperature: torch.Tensor | None = None,
    kv_prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    positions: Any = None,
    index: int = 0,
) -> torch.Tensor:
    """The block's self-attention with the logits divided by ``temperature`` (GaPT) and/or key/value
    prompts ``(P_k, P_v)``, each ``(H, L, d_h)``, prepended to the keys and values after the head split, any
    q/k norm and the family's positions (``positions`` of block ``index``, the model's: EVA-02's rotary
    embedding, BEiT's relative position bias; the prompts get none) (E2VPT). With neither it computes the
    block's own attention of ``x``."""
    family = attention_family(attn)
    q, k, v = family.split_heads(attn, family.project(attn, x)).unbind(0)
    q, k = family.norm_qk(attn, q, k)
    q, k, bias = family.place(attn, q, k, positions, index)
    if temperature is not None:
        q = q / temperature
    if kv_prefix is not None:
        pk, pv = (p.unsqueeze(0).expand(x.shape[0], -1, -1, -1).to(k.dtype) for p in kv_prefix)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if bias is not None:
            bias = F.pad(bias, (pk.shape[2], 0))
    heads = family.attend(attn, q, k, v, attn_mask=bias)
    return family.attention_output(attn, family.merge_heads(attn, heads), x)


def cross_attention(attn: nn.Module, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """CVPT: queries from ``x`` (B, N, D), keys and values from ``prompts`` (B, M, D), all through the
    block's own frozen ``qkv`` rows (and q/k norm) and ``proj``; no LayerNorm. Output ``(B, N, D)``."""
    family = attention_family(attn)
    q = family.split_heads(attn, family.project(attn, x, 0))[0]
    k = family.split_heads(attn, family.project(attn, prompts, 1))[0]
    v = family.split_heads(attn, family.project(attn, prompts, 2))[0]
    q, k = family.norm_qk(attn, q, k)
    return family.attention_output(attn, family.merge_heads(attn, family.attend(attn, q, k, v)), x)


@torch.no_grad()
def frozen_layers(
    backbone: nn.Module, images: torch.Tensor, num_layers: int
) -> Iterator[tuple[tuple[int, int], nn.Module, torch.Tensor]]:
    """``(grid, block, x)`` for the first ``num_layers`` blocks of the frozen backbone without prompts:
    ``x`` is the block's whole input sequence (prefix tokens included), ``grid`` the patch grid."""
    family = backbone_family(backbone)
    patches = family.embed_patches(backbone, images)
    grid = family.patch_grid(backbone, images, patches)
    x = family.pre_blocks(backbone, family.embed_tokens(backbone, patches))
    where = family.positions(backbone, images)
    for block, tokens in family.tokens_entering_blocks(backbone, x, num_layers, where):
        yield grid, block, tokens


def as_grid(tokens: torch.Tensor, grid: tuple[int, int], prefix: int) -> torch.Tensor:
    """The patch part of a ``(B, prefix + H*W, C)`` sequence laid out as ``(B, H, W, C)``."""
    return tokens[:, prefix:].reshape(tokens.shape[0], *grid, -1)


class PromptPart:
    """Part of a model's prompts seen as a model :func:`selfprompt.init.init_prompts` fills: ``num_prompts``
    tokens of width ``embed_dim`` per layer, built from the grids ``tokens_by_layer(images, num_layers)``
    returns (None: the patch tokens, as SPT). Read ``prompts`` after the call and copy it where it belongs."""

    def __init__(
        self,
        model: nn.Module,
        num_prompts: int,
        num_layers: int,
        embed_dim: int | None = None,
        tokens_by_layer: Callable[[torch.Tensor, int], list[torch.Tensor]] | None = None,
    ) -> None:
        self.backbone = model.backbone
        self.num_prompts, self.num_prompt_layers = num_prompts, num_layers
        self.embed_dim = embed_dim or model.embed_dim
        self._bound = model.xavier_bound()
        reference = model.prompts
        shape = (num_layers, num_prompts, self.embed_dim)
        self.prompts = nn.Parameter(
            torch.empty(shape, device=reference.device, dtype=reference.dtype), requires_grad=False
        )
        if tokens_by_layer is not None:
            self.prompt_tokens_by_layer = tokens_by_layer

    def xavier_bound(self) -> float:
        return self._bound
