"""The internals of timm's ``Eva`` family (EVA, EVA-02, the RoPE ViTs timm builds with it), with the names
of :mod:`selfprompt.backbones.vit`.

The prologue is timm's ``forward_features`` up to block 0: ``patch_embed``, ``_pos_embed`` (prefix tokens,
absolute position embedding, ``patch_drop``; its rotary embedding is computed by :func:`positions`
instead), then ``norm_pre``. Blocks take the rotary embedding of the patch tokens (``rope``); tokens a
method inserts after the prefix get none: their rows of the embedding are the identity rotation (sine 0,
cosine 1), so that timm's own block runs them exactly as it runs its class and register tokens.

The attention steps follow ``EvaAttention`` without its rotary step (methods that compute the attention
themselves are not offered on this family): the fused ``qkv`` with its ``q_bias``/``k_bias``/``v_bias``, or
the separate ``q_proj``/``k_proj``/``v_proj``, then as :mod:`vit` (q/k norm, scale ``norm``, ``gate``,
``proj``). :mod:`selfprompt.backbones.beit` shares them (BEiT's attention has the same projection).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from selfprompt.backbones import vit
from selfprompt.backbones.vit import attend, attention_output, walk_blocks

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

NAME = "eva"
MODEL_CLASS = Eva
BLOCK_CLASS = EvaBlock
ATTENTION_CLASS = EvaAttention
EXAMPLES = "eva02_*, eva_*, vit_*_rope_* made by timm.create_model"
BLOCKS_PATH = vit.BLOCKS_PATH
CAPABILITIES = frozenset({"prompts", "branches", "attention", "key_value_prompts"})
LACKS = {
    "serving": "the multi-task server runs the blocks without its rotary position embedding yet; serve its "
    "adapters one model at a time (selfprompt.load_pretrained)",
}
LINEARS = {
    "qkv": r"attn\.(qkv|q_proj|k_proj|v_proj)",
    "attn.proj": r"attn\.proj",
    "mlp.fc1": r"mlp\.(fc1|fc1_g|fc1_x)",
    "mlp.fc2": r"mlp\.fc2",
}


@dataclass(frozen=True)
class Positions:
    """What Eva's blocks need besides the tokens: the number of tokens that have a position (prefix and
    patches; any more were inserted after the prefix) and the rotary embedding of the patches (None without
    one; one per block with timm's ``rope_type='mixed'``)."""

    tokens: int
    rope: torch.Tensor | None
    per_block: bool = False


# --- the token prologue ---------------------------------------------------------------------------------


def embed_patches(backbone: Eva, images: torch.Tensor) -> torch.Tensor:
    """timm's ``patch_embed``: ``(B, N, D)``, or ``(B, H, W, D)`` with ``dynamic_img_size``."""
    return backbone.patch_embed(images)


patch_grid = vit.patch_grid
final_norms = vit.final_norms


def embed_tokens(backbone: Eva, patches: torch.Tensor, patch_drop: bool = True) -> torch.Tensor:
    """``[prefix ; patches]`` with the absolute position embedding (timm's ``_pos_embed``, its rotary part
    left to :func:`positions`). Dropping patches while training is refused: the rotary embedding would have
    to follow the kept ones."""
    if backbone.patch_drop is not None and backbone.training:
        raise ValueError(
            "selfprompt runs timm Eva backbones without patch dropout; create it with patch_drop_rate=0."
        )
    return backbone._pos_embed(patches)[0]


def pre_blocks(backbone: Eva, x: torch.Tensor) -> torch.Tensor:
    """The last step before block 0 (timm's ``norm_pre``)."""
    return backbone.norm_pre(x)


def prologue(
    backbone: Eva, images: torch.Tensor, insert: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The sequence entering block 0, as timm's ``forward_features`` computes it; ``insert`` changes the
    sequence after the position embedding, before ``norm_pre``."""
    x = embed_tokens(backbone, embed_patches(backbone, images))
    return pre_blocks(backbone, x if insert is None else insert(x))


def positions(backbone: Eva, images: torch.Tensor | None = None) -> Positions:
    """The rotary embedding of the patch grid of ``images`` (None: the backbone's image size), as timm's
    ``_pos_embed`` computes it."""
    grid = backbone.patch_embed.grid_size
    if images is not None and backbone.dynamic_img_size:
        grid = tuple(backbone.patch_embed.dynamic_feat_size(images.shape[-2:]))
    tokens = backbone.num_prefix_tokens + grid[0] * grid[1]
    rope, per_block = backbone.rope, getattr(backbone, "rope_mixed", False)
    if rope is None:
        return Positions(tokens, None)
    if hasattr(rope, "feat_shape") and not backbone.dynamic_img_size:
        return Positions(tokens, rope.get_embed(), per_block)
    return Positions(tokens, rope.get_embed(shape=grid), per_block)


_positions = positions


def block_rope(tokens: int, positions: Positions | None, index: int) -> torch.Tensor | None:
    """The rotary embedding block ``index`` takes for a sequence of ``tokens``: the patches' own, after
    identity rows (sine 0, cosine 1) for the tokens inserted after the prefix, which so keep no position."""
    rope = None if positions is None else positions.rope
    if rope is None:
        return None
    if positions.per_block:
        rope = rope[index]
    extra = tokens - positions.tokens
    if extra == 0:
        return rope
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)])
    rows = identity.expand(*rope.shape[:-2], extra, 2 * half)
    return torch.cat([rows, rope], dim=-2)


def run_block(block: nn.Module, x: torch.Tensor, positions: Positions, index: int = 0) -> torch.Tensor:
    """Block ``index`` on ``x``: timm's own forward with the rotary embedding of :func:`block_rope`."""
    return block(x, rope=block_rope(x.shape[1], positions, index))


def residual_branches(
    block: EvaBlock,
    x: torch.Tensor,
    positions: Positions,
    index: int = 0,
    attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_attn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``EvaBlock``'s forward with its branches replaceable (as :func:`vit.residual_branches`; the layer
    scales are ``gamma_1``/``gamma_2``); with no replacement exactly :func:`run_block`."""
    if not isinstance(block, EvaBlock):
        raise TypeError(
            f"this method acts inside timm's pre-norm EvaBlock; this block is a {type(block).__name__}."
        )
    if attn is None:
        rope = block_rope(x.shape[1], positions, index)
        attn = lambda h: block.attn(h, rope=rope)  # noqa: E731
    return gamma_branches(block, x, attn, after_attn, mlp)


def gamma_branches(
    block: nn.Module,
    x: torch.Tensor,
    attn: Callable[[torch.Tensor], torch.Tensor],
    after_attn: Callable[[torch.Tensor], torch.Tensor] | None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """The pre-norm residual step of a block whose layer scales are ``gamma_1``/``gamma_2`` (None: none), as
    EVA's and BEiT's blocks compute it: ``x + drop_path(gamma_1 * attn(norm1 x))``, then ``after_attn``, then
    ``+ drop_path(gamma_2 * mlp(norm2 x))``."""
    branch = attn(block.norm1(x))
    x = x + block.drop_path1(branch if block.gamma_1 is None else block.gamma_1 * branch)
    if after_attn is not None:
        x = after_attn(x)
    branch = (mlp or block.mlp)(block.norm2(x))
    return x + block.drop_path2(branch if block.gamma_2 is None else block.gamma_2 * branch)


def tokens_entering_blocks(
    backbone: Eva, x: torch.Tensor, num_blocks: int | None = None, positions: Positions | None = None
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """As :func:`vit.tokens_entering_blocks`, with the rotary embedding of ``positions`` (None: the
    backbone's image size)."""
    where = positions if positions is not None else _positions(backbone)
    return walk_blocks(backbone.blocks[:num_blocks], x, lambda block, h, i: run_block(block, h, where, i))


# --- the layers methods change ------------------------------------------------------------------------


def block_ops(block: nn.Module) -> tuple[str, ...]:
    """The ops of ``block`` SSF follows, in forward order: its Linear layers and affine LayerNorms (after
    :func:`plain_linears`, the fused ``qkv`` carries its bias)."""
    return tuple(
        name
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
        or (
            isinstance(module, nn.LayerNorm)
            and module.elementwise_affine
            and len(module.normalized_shape) == 1
        )
    )


@torch.no_grad()
def plain_linears(backbone: nn.Module) -> None:
    """Give each fused ``qkv`` its bias (``q_bias``, zero ``k_bias``, ``v_bias``, frozen) so that the block
    calls it as a module (timm calls ``F.linear`` with its weight otherwise): for methods that wrap or
    replace Linear modules (LoRA, SSF), on their private copy of the backbone. The outputs are unchanged."""
    for block in backbone.blocks:
        attn = block.attn
        if getattr(attn, "qkv", None) is None or getattr(attn, "q_bias", None) is None:
            continue
        bias = torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        attn.qkv.bias = nn.Parameter(bias, requires_grad=False)
        attn.q_bias = attn.v_bias = None
        attn.k_bias = None
        attn.qkv_bias_separate = False


# --- the attention's steps --------------------------------------------------------------------------------


optional_part = vit.optional_part


def qkv_rows(attn: nn.Module, part: int) -> slice:
    """The rows of a fused ``attn.qkv`` that make queries (0), keys (1) or values (2)."""
    if getattr(attn, "qkv", None) is None:
        raise TypeError("this attention has separate q/k/v projections, not a fused qkv.")
    width = attn.num_heads * head_dim(attn)
    return slice(part * width, (part + 1) * width)


def _qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv.bias
    return torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])


def project(attn: nn.Module, x: torch.Tensor, part: int | None = None) -> torch.Tensor:
    """``x`` through the query, key and value projections (fused or separate), or only one of them."""
    if getattr(attn, "qkv", None) is None:
        layers = (attn.q_proj, attn.k_proj, attn.v_proj)
        return layers[part](x) if part is not None else torch.cat([layer(x) for layer in layers], dim=-1)
    weight, bias = attn.qkv.weight, _qkv_bias(attn)
    if part is not None:
        rows = qkv_rows(attn, part)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return F.linear(x, weight, bias)


def head_dim(attn: nn.Module) -> int:
    """Channels per head (BEiT's attention does not record it)."""
    return attn.proj.in_features // attn.num_heads


def split_heads(attn: nn.Module, projected: torch.Tensor) -> torch.Tensor:
    """``(B, N, parts * H * d_h)`` from :func:`project` as ``(parts, B, H, N, d_h)``."""
    batch, tokens, _ = projected.shape
    return projected.reshape(batch, tokens, -1, attn.num_heads, head_dim(attn)).permute(2, 0, 3, 1, 4)


def merge_heads(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d_h)`` as ``(B, N, H * d_h)``."""
    batch, _, tokens, _ = heads.shape
    return heads.transpose(1, 2).reshape(batch, tokens, attn.num_heads * head_dim(attn))


def norm_qk(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head ``q_norm`` and ``k_norm`` where the attention has them."""
    q_norm, k_norm = optional_part(attn, "q_norm"), optional_part(attn, "k_norm")
    return (q if q_norm is None else q_norm(q)), (k if k_norm is None else k_norm(k))


def place(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, positions: Positions | None, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries and keys ``(B, H, N, d_h)`` of block ``index`` given their positions, as ``EvaAttention``
    does after its q/k norm: the rotary embedding of :func:`block_rope` on the tokens after the prefix (none
    without ``positions``); no additive bias."""
    rope = block_rope(q.shape[-2], positions, index)
    if rope is None:
        return q, k, None
    p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
    q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(q)
    k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(k)
    return q, k, None


def attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``attn(x)`` without a rotary embedding, from the steps above."""
    q, k, v = split_heads(attn, project(attn, x)).unbind(0)
    q, k = norm_qk(attn, q, k)
    return attention_output(attn, merge_heads(attn, attend(attn, q, k, v)), x)
