"""One timm ``Block`` over batches of different sequence lengths in one call ("packed" tokens).

Every operation of a ViT block but attention is token-wise, so the tokens of all batches stay in one
``(total_tokens, D)`` matrix and the norms, the qkv and output projections and the MLP run once over it, as
GEMMs as large as one batch of the same tokens would give. Only scaled dot-product attention runs per batch,
on its own ``(B, heads, L, head_dim)`` view. No padding, no mask: each sequence computes what the block
computes on its batch alone (up to float rounding; ``tests/test_serving.py``). The residual sums are written
into the matrix in place, which keeps the large temporaries (and the allocator's page faults) down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from selfprompt.backbones import attention_family

import torch
from torch import nn

#: ``(h, out) -> out'``: what a pass's attention output becomes, given the block's normed input ``h``.
AttentionTerm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def packable(blocks: Sequence[nn.Module]) -> bool:
    """True when every block is its family's plain block class with the family's plain attention class
    (whose forward :func:`packed_block` follows); subclasses and other blocks run one batch at a time."""
    families = [attention_family(b.attn) for b in blocks]
    return all(
        f is not None
        and "serving" in f.capabilities
        and type(b) is f.block_class
        and type(b.attn) is f.attention_class
        for b, f in zip(blocks, families, strict=True)
    )


def packed_block(
    block: nn.Module,
    flat: torch.Tensor,
    shapes: Sequence[tuple[int, int]],
    terms: Sequence[AttentionTerm] | None = None,
) -> torch.Tensor:
    """``block`` in inference over packed sequences: ``flat`` ``(sum B_i * L_i, D)`` holds batch ``i``'s
    ``(B_i, L_i, D)`` tokens after batch ``i - 1``'s, ``shapes`` the ``(B_i, L_i)``. ``flat`` is updated in
    place (no autograd) and returned: each batch's rows become ``block(batch)``; with ``terms``, batch ``i``'s
    attention output (after its projection) becomes ``terms[i](h_i, output_i)`` first."""
    family = attention_family(block.attn)
    attn = block.attn
    heads, head_dim = attn.num_heads, attn.head_dim
    h = block.norm1(flat)
    qkv = family.project(attn, h)
    out = qkv.new_empty(flat.shape[0], heads * head_dim)
    start = 0
    for batch, length in shapes:
        end = start + batch * length
        q, k, v = family.split_heads(attn, qkv[start:end].view(batch, length, -1)).unbind(0)
        o = family.attend(attn, *family.norm_qk(attn, q, k), v)
        out[start:end].view(batch, length, heads, head_dim).copy_(o.transpose(1, 2))
        start = end
    attended = family.attention_output(attn, out, h)
    if terms is not None:
        start = 0
        for (batch, length), term in zip(shapes, terms, strict=True):
            end = start + batch * length
            part = attended[start:end].view(batch, length, -1)
            part.copy_(term(h[start:end].view(batch, length, -1), part))
            start = end
    flat += block.drop_path1(block.ls1(attended))
    flat += block.drop_path2(block.ls2(block.mlp(block.norm2(flat))))
    return flat
