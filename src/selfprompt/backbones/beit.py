"""The internals of timm's ``Beit`` family (BEiT, BEiT v2), with the names of :mod:`selfprompt.backbones.vit`.

The prologue is timm's ``forward_features`` up to block 0: ``patch_embed``, the class token, the absolute
position embedding (where the model has one) and ``pos_drop``. Blocks take BEiT's relative position bias,
each its own (``relative_position_bias_table``) plus, with ``use_shared_rel_pos_bias``, the model's shared
one (:func:`positions`). Tokens a method inserts after the class token are kept out of it: their rows and
columns of the bias are zero. Without inserted tokens a block is timm's own forward; with them it is
computed from the attention's steps (those of :mod:`selfprompt.backbones.eva`: BEiT's fused ``qkv`` with
``q_bias``/``k_bias``/``v_bias``) with the widened bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from selfprompt.backbones import eva, vit
from selfprompt.backbones.eva import (
    attend,
    attention_output,
    block_ops,
    merge_heads,
    norm_qk,
    optional_part,
    plain_linears,
    project,
    qkv_rows,
    split_heads,
)

import torch
from timm.models.beit import Attention, Beit, Block
from torch import nn

NAME = "beit"
MODEL_CLASS = Beit
BLOCK_CLASS = Block
ATTENTION_CLASS = Attention
EXAMPLES = "beit_*, beitv2_* made by timm.create_model"
BLOCKS_PATH = vit.BLOCKS_PATH
CAPABILITIES = frozenset({"prompts", "branches", "attention"})
LACKS = {
    "serving": "the multi-task server runs the blocks without its relative position bias yet; serve its "
    "adapters one model at a time (selfprompt.load_pretrained)",
    "key_value_prompts": "E2VPT shapes its key/value prompts by the attention's head_dim, which timm's Beit "
    "attention does not record",
}
LINEARS = eva.LINEARS


@dataclass(frozen=True)
class Positions:
    """What BEiT's blocks need besides the tokens: the number of tokens with a position (class token and
    patches; any more were inserted after the class token) and the shared relative position bias (None
    without one), ``(heads, tokens, tokens)``."""

    tokens: int
    shared: torch.Tensor | None


# --- the token prologue ---------------------------------------------------------------------------------


def embed_patches(backbone: Beit, images: torch.Tensor) -> torch.Tensor:
    """timm's ``patch_embed``: ``(B, N, D)``."""
    return backbone.patch_embed(images)


patch_grid = vit.patch_grid
final_norms = vit.final_norms


def embed_tokens(backbone: Beit, patches: torch.Tensor, patch_drop: bool = True) -> torch.Tensor:
    """``[class token ; patches]`` with the absolute position embedding and ``pos_drop`` (BEiT has no patch
    dropout)."""
    x = torch.cat([backbone.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
    if backbone.pos_embed is not None:
        x = x + backbone.pos_embed
    return backbone.pos_drop(x)


def pre_blocks(backbone: Beit, x: torch.Tensor) -> torch.Tensor:
    """Nothing runs between the position embedding and block 0."""
    return x


def prologue(
    backbone: Beit, images: torch.Tensor, insert: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The sequence entering block 0, as timm's ``forward_features`` computes it; ``insert`` changes the
    sequence after the position embedding."""
    x = embed_tokens(backbone, embed_patches(backbone, images))
    return pre_blocks(backbone, x if insert is None else insert(x))


def positions(backbone: Beit, images: torch.Tensor | None = None) -> Positions:
    """The shared relative position bias (BEiT has a fixed image size)."""
    shared = backbone.rel_pos_bias() if backbone.rel_pos_bias is not None else None
    return Positions(backbone.num_prefix_tokens + backbone.patch_embed.num_patches, shared)


_positions = positions


def position_bias(attn: Attention, tokens: int, positions: Positions) -> torch.Tensor | None:
    """The relative position bias the attention adds to its logits for a sequence of ``tokens``,
    ``(1, heads, N, N)``: its own plus the shared one, with zero rows and columns for the tokens inserted
    after the class token."""
    bias = None if attn.relative_position_bias_table is None else attn._get_rel_pos_bias()
    if positions.shared is not None:
        bias = positions.shared.unsqueeze(0) if bias is None else bias + positions.shared
    extra = tokens - positions.tokens
    if bias is None or extra == 0:
        return bias
    n = tokens
    kept = torch.cat([torch.arange(1), torch.arange(1 + extra, n)]).to(bias.device)
    wide = bias.new_zeros(*bias.shape[:-2], n, n)
    wide[..., kept[:, None], kept[None, :]] = bias
    return wide


def place(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, positions: Positions | None, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries and keys ``(B, H, N, d_h)`` unchanged, and the additive bias of :func:`position_bias` (the
    attention's own only without ``positions``)."""
    where = positions if positions is not None else Positions(q.shape[-2], None)
    return q, k, position_bias(attn, q.shape[-2], where)


def attention(attn: Attention, x: torch.Tensor, positions: Positions | None = None) -> torch.Tensor:
    """``attn(x)`` from the steps, with the relative position bias of :func:`position_bias` (its own only
    when ``positions`` is None)."""
    where = positions if positions is not None else Positions(x.shape[1], None)
    q, k, v = split_heads(attn, project(attn, x)).unbind(0)
    q, k = norm_qk(attn, q, k)
    heads = attend(attn, q, k, v, attn_mask=position_bias(attn, x.shape[1], where))
    return attention_output(attn, merge_heads(attn, heads), x)


def residual_branches(
    block: Block,
    x: torch.Tensor,
    positions: Positions,
    index: int = 0,
    attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """BEiT's ``Block`` forward with its branches replaceable (as :func:`vit.residual_branches`; the layer
    scales are ``gamma_1``/``gamma_2``); with no replacement exactly :func:`run_block`."""
    if not isinstance(block, Block):
        raise TypeError(f"this method acts inside timm's Beit Block; this block is a {type(block).__name__}.")
    if attn is None:
        if x.shape[1] == positions.tokens:
            attn = lambda h: block.attn(h, shared_rel_pos_bias=positions.shared)  # noqa: E731
        else:
            attn = lambda h: attention(block.attn, h, positions)  # noqa: E731
    return eva.gamma_branches(block, x, attn, after_attn, mlp)


def run_block(block: Block, x: torch.Tensor, positions: Positions, index: int = 0) -> torch.Tensor:
    """Block ``index`` on ``x``: timm's own forward, or with inserted tokens :func:`residual_branches`."""
    if x.shape[1] == positions.tokens:
        return block(x, shared_rel_pos_bias=positions.shared)
    return residual_branches(block, x, positions, index)


def tokens_entering_blocks(
    backbone: Beit, x: torch.Tensor, num_blocks: int | None = None, positions: Positions | None = None
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """As :func:`vit.tokens_entering_blocks`, with the shared relative position bias."""
    where = positions if positions is not None else _positions(backbone)
    return vit.walk_blocks(backbone.blocks[:num_blocks], x, lambda block, h, i: run_block(block, h, where, i))


__all__ = ["block_ops", "optional_part", "plain_linears", "qkv_rows"]
