"""The internals of timm's ``VisionTransformer`` family, in one place: the token prologue (image -> the
sequence entering block 0), the tokens entering each block, and one decomposition of timm's ``Attention``.

Methods, initializers and serving call these functions (through :func:`selfprompt.backbones.backbone_family`)
instead of timm's private steps. A second family (timm's ``Eva``, ``Beit``) is a second module with the same
names, registered in :mod:`selfprompt.backbones.family`.

The prologue is timm's ``forward_features`` up to block 0, in its own order: ``patch_embed``, ``_pos_embed``
(prefix tokens and position embedding), ``patch_drop``, then ``norm_pre``. Methods insert tokens between
:func:`embed_tokens` and :func:`pre_blocks`.

The attention steps follow ``timm.layers.Attention.forward``: the fused ``qkv`` projection split into heads,
``q_norm``/``k_norm``, scaled dot-product attention (always ``F.scaled_dot_product_attention``, the kernel
timm's fused path uses, with ``scale`` passed), heads merged, then the scale ``norm``, the output ``gate``
(computed from the attention's input), ``proj`` and ``proj_drop``. ``norm`` and ``gate`` are optional parts
(older timm releases have neither): both are read through :func:`optional_part` and skipped when absent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

NAME = "vit"
MODEL_CLASS = VisionTransformer
BLOCK_CLASS = Block
ATTENTION_CLASS = Attention
EXAMPLES = "vit_*, deit3_*, ... made by timm.create_model"
#: Where the blocks the classifier runs one after the other are (``backbone.blocks``).
BLOCKS_PATH = "blocks"
#: What the methods may rely on (see :class:`selfprompt.backbones.BackboneFamily`): all of it.
CAPABILITIES = frozenset({"prompts", "branches", "attention", "key_value_prompts", "serving"})
LACKS: dict[str, str] = {}
#: The Linear layers of a block by their canonical name (LoRA's targets), as regular expressions of their
#: path inside the block.
LINEARS = {"qkv": r"attn\.qkv", "attn.proj": r"attn\.proj", "mlp.fc1": r"mlp\.fc1", "mlp.fc2": r"mlp\.fc2"}
#: The ops of a block SSF follows, by their path inside it, in forward order.
BLOCK_OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


# --- the token prologue ---------------------------------------------------------------------------------


def embed_patches(backbone: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """timm's ``patch_embed``: ``(B, N, D)``, or ``(B, H, W, D)`` with ``dynamic_img_size``."""
    return backbone.patch_embed(images)


def patch_grid(backbone: VisionTransformer, images: torch.Tensor, patches: torch.Tensor) -> tuple[int, int]:
    """The patch grid ``(H, W)`` of :func:`embed_patches` output ``patches`` for ``images``."""
    if patches.ndim == 4:  # dynamic_img_size keeps the grid
        return tuple(patches.shape[1:3])
    return tuple(backbone.patch_embed.dynamic_feat_size(images.shape[-2:]))


def embed_tokens(backbone: VisionTransformer, patches: torch.Tensor, patch_drop: bool = True) -> torch.Tensor:
    """``[prefix ; patches]`` with the position embedding (timm's ``_pos_embed``: class and register tokens,
    ``no_embed_class``, a resampled embedding for a dynamic size), then ``patch_drop`` unless the caller
    drops patches itself (MAE's masking): the sequence into which methods insert tokens."""
    x = backbone._pos_embed(patches)
    return backbone.patch_drop(x) if patch_drop else x


def pre_blocks(backbone: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The last step before block 0 (timm's ``norm_pre``)."""
    return backbone.norm_pre(x)


def prologue(
    backbone: VisionTransformer,
    images: torch.Tensor,
    insert: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The sequence entering block 0, as timm's ``forward_features`` computes it; ``insert`` changes the
    sequence after the position embedding (prompts), before ``norm_pre``."""
    x = embed_tokens(backbone, embed_patches(backbone, images))
    return pre_blocks(backbone, x if insert is None else insert(x))


def positions(backbone: VisionTransformer, images: torch.Tensor | None = None) -> None:
    """What the blocks need besides the tokens for ``images`` (a family with rotary embeddings or a
    relative position bias computes it here): nothing, the position embedding is added in the prologue."""
    return None


def run_block(block: nn.Module, x: torch.Tensor, positions: None = None, index: int = 0) -> torch.Tensor:
    """Block ``index`` on ``x``, whatever tokens were inserted after the prefix: timm's own forward."""
    return block(x)


def residual_branches(
    block: nn.Module,
    x: torch.Tensor,
    positions: None = None,
    index: int = 0,
    attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """timm's pre-norm ``Block`` with its branches replaceable: ``x1 = x + drop_path(ls(attn(norm1(x))))``,
    ``x1 = after_attn(x1)``, then ``x1 + drop_path(ls(mlp(norm2(x1))))``; with no replacement exactly
    ``block(x)``."""
    if not isinstance(block, Block):
        raise TypeError(
            f"this method acts inside timm's pre-norm Block, and this backbone's blocks are "
            f"{type(block).__name__}; use a prompt method that wraps whole blocks (vpt-*, spt-*)."
        )
    x = x + block.drop_path1(block.ls1((attn or block.attn)(block.norm1(x))))
    if after_attn is not None:
        x = after_attn(x)
    return x + block.drop_path2(block.ls2((mlp or block.mlp)(block.norm2(x))))


@torch.no_grad()
def walk_blocks(
    blocks: Iterable[nn.Module], x: torch.Tensor, step: Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """``(block, tokens entering it)`` along ``blocks`` from ``x``, ``step(block, x, index)`` running one;
    block i runs only when the consumer asks for block i + 1 (the last block yielded is not run). Frozen
    inference: no gradient. Every family's :func:`tokens_entering_blocks` is this loop."""
    blocks = list(blocks)
    for index, block in enumerate(blocks):
        yield block, x
        if index + 1 < len(blocks):
            x = step(block, x, index)


def tokens_entering_blocks(
    backbone: VisionTransformer, x: torch.Tensor, num_blocks: int | None = None, positions: Any = None
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """``(block, tokens entering it)`` for the first ``num_blocks`` blocks (all by default), from ``x``
    entering block 0 (:func:`prologue`); the first k pairs cost k - 1 blocks. ``positions``: the family's
    :func:`positions` for the images (None: those of the backbone's own image size)."""
    return walk_blocks(backbone.blocks[:num_blocks], x, lambda block, h, _: block(h))


def final_norms(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The final norm on the tokens and the norm after pooling (timm's ``norm`` and ``fc_norm``)."""
    return backbone.norm, backbone.fc_norm


def block_ops(block: nn.Module) -> tuple[str, ...]:
    """The paths inside ``block`` of the ops SSF follows (:data:`BLOCK_OPS`); refuses another block type."""
    if not isinstance(block, Block):
        raise TypeError(
            f"SSF follows the ops of timm's pre-norm Block, and this block is a {type(block).__name__}."
        )
    return BLOCK_OPS


def plain_linears(backbone: nn.Module) -> None:
    """Make every Linear of the blocks a module the block calls (nothing to do: timm's ViT calls them all)."""


# --- one decomposition of timm's Attention --------------------------------------------------------------


def optional_part(attn: Attention, name: str) -> nn.Module | None:
    """An optional step of timm's ``Attention`` (``norm``, ``gate``): None when it is off or when this timm
    release has no such step."""
    part = getattr(attn, name, None)
    return None if isinstance(part, nn.Identity) else part


def qkv_rows(attn: Attention, part: int) -> slice:
    """The rows of ``attn.qkv`` that make queries (0), keys (1) or values (2)."""
    width = attn.num_heads * attn.head_dim
    return slice(part * width, (part + 1) * width)


def project(attn: Attention, x: torch.Tensor, part: int | None = None) -> torch.Tensor:
    """``x`` (any leading shape) through ``attn.qkv``, or only its query (0), key (1) or value (2) rows:
    views of the frozen weights, no copies."""
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if part is not None:
        rows = qkv_rows(attn, part)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return F.linear(x, weight, bias)


def split_heads(attn: Attention, projected: torch.Tensor) -> torch.Tensor:
    """``(B, N, parts * H * d_h)`` from :func:`project` as ``(parts, B, H, N, d_h)``."""
    batch, tokens, _ = projected.shape
    return projected.reshape(batch, tokens, -1, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)


def norm_qk(attn: Attention, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's per-head ``q_norm`` and ``k_norm`` (identities without ``qk_norm``)."""
    return attn.q_norm(q), attn.k_norm(k)


def attend(
    attn: Attention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of heads ``q`` over ``k``/``v`` (keys may be longer than queries), with
    ``attn``'s scale and its attention dropout in training: ``(B, H, N, d_h)``."""
    dropout = attn.attn_drop.p if attn.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=attn.scale)


def merge_heads(attn: Attention, heads: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d_h)`` as ``(B, N, H * d_h)``."""
    batch, _, tokens, _ = heads.shape
    return heads.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)


def attention_output(attn: Attention, merged: torch.Tensor, attn_input: torch.Tensor) -> torch.Tensor:
    """timm's steps after the heads are merged (any leading shape): the scale ``norm``, the output ``gate``
    from the attention's input ``attn_input``, ``proj`` and ``proj_drop``."""
    norm, gate = optional_part(attn, "norm"), optional_part(attn, "gate")
    x = merged if norm is None else norm(merged)
    if gate is not None:
        x = x * gate(attn_input).sigmoid()
    return attn.proj_drop(attn.proj(x))


def place(
    attn: Attention, q: torch.Tensor, k: torch.Tensor, positions: None = None, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries and keys given their positions, and any additive bias on the logits: nothing to do (the
    position embedding was added in the prologue)."""
    return q, k, None


def attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """``attn(x)`` from the steps above (timm's forward with the fused kernel)."""
    q, k, v = split_heads(attn, project(attn, x)).unbind(0)
    q, k = norm_qk(attn, q, k)
    return attention_output(attn, merge_heads(attn, attend(attn, q, k, v)), x)
