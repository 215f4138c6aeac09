"""VIPAMIN (Park & Chung, NeurIPS 2025): prompts matched to the task's tokens in key space, plus a share
pushed out of the span of the block's attention outputs. See docs/methods.md, VIPAMIN, for the equations and
where this follows the paper or the official code."""

from __future__ import annotations

import math
import warnings

from selfprompt.init.collect import BlockInput
from selfprompt.init.registry import PromptInitializer, register_initializer

import torch
import torch.nn.functional as F

#: Defaults of the two options, ours: the middle of the official sweep (k in {2, 8, 32, 128}, lambda in
#: {0, 0.5, 1}); the official config's K = 1, LAMB = 0 are placeholders its scripts never produce.
DEFAULT_TOPK = 8
DEFAULT_LAMBDA = 0.5


def check_options(topk: object, lam: object) -> list[str]:
    """What is wrong with VIPAMIN's options, as ``name must be ..., got ...`` (empty when they can run)."""
    out = []
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        out.append(f"topk must be an integer >= 1 (patch tokens averaged per prompt), got {topk!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        out.append(f"lam must be a number in [0, 1] (the orthogonal share), got {lam!r}")
    return out


@register_initializer("vipamin")
class VipaminInit(PromptInitializer):
    """VIPAMIN: one layer's prompts ``(1 - lam) * matched + lam * orthogonal``, from one pass over the images.

    Matching: M random prompts (VPT's xavier draw, ``queries``) are compared with the layer's patch positions
    by the cosine of their keys (block's ``norm1`` then key projection, averaged over heads; patch keys also
    averaged over the images); each prompt becomes the image-averaged token entering the block at its
    ``topk`` nearest positions, averaged. Orthogonalizing: M more xavier draws (``seeds``) are mapped through
    the value projection, projected off the span of the block's image-averaged attention outputs (heads
    merged, before ``proj``; prefix tokens included) and mapped back with the projection's pseudo-inverse.
    """

    reads_blocks = True
    options = ("topk", "lam")

    def __init__(
        self,
        model,
        *,
        generator: torch.Generator,
        max_tokens: int,
        topk: int = DEFAULT_TOPK,
        lam: float = DEFAULT_LAMBDA,
    ) -> None:
        super().__init__(model, generator=generator, max_tokens=max_tokens)
        problems = check_options(topk, lam)
        if problems:
            raise ValueError(f"Prompt init 'vipamin': {'; '.join(problems)}.")
        self.topk, self.lam = topk, float(lam)
        bound, shape = model.xavier_bound(), (model.num_prompts, model.embed_dim)
        self.queries = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        self.seeds = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        self.inputs: BlockInput | None = None
        self.count = 0
        self.tokens = self.keys = self.outputs = None

    @torch.no_grad()
    def update_block(self, inputs: BlockInput) -> None:
        family, attn, p = inputs.family, inputs.block.attn, inputs.prefix
        h = inputs.block.norm1(inputs.tokens)
        q, k, v = family.split_heads(attn, family.project(attn, h)).unbind(0)
        keys = family.project(attn, h[:, p:], 1)  # raw keys, as the official code reads them from qkv
        q, k = family.norm_qk(attn, q, k)
        q, k, bias = family.place(attn, q, k, inputs.positions, inputs.index)
        outputs = family.merge_heads(attn, family.attend(attn, q, k, v, bias))
        sums = [t.double().sum(0).cpu() for t in (inputs.tokens[:, p:], keys, outputs)]
        if self.tokens is None:
            self.tokens, self.keys, self.outputs = sums
        elif sums[2].shape != self.outputs.shape:
            raise ValueError(
                f"vipamin averages tokens position by position, and the images give {len(sums[2])} tokens "
                f"where earlier ones gave {len(self.outputs)}; use one image size."
            )
        else:
            for total, add in zip((self.tokens, self.keys, self.outputs), sums, strict=True):
                total += add
        self.inputs, self.count = inputs, self.count + len(inputs.tokens)

    @torch.no_grad()
    def _value_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's value projection in row form, ``v = r @ weight + bias``: (D, D_attn) and (D_attn,)."""
        inputs = self.inputs
        reference = inputs.tokens
        # through the family's projection (fused or separate q/k/v), on 1024 * I: the bias then rounds away
        # against 1024 * W, not against W (what the pseudo-inverse, with its condition number, amplifies)
        scale = 1024.0
        eye = torch.eye(reference.shape[-1], device=reference.device, dtype=reference.dtype) * scale
        bias = inputs.family.project(inputs.block.attn, torch.zeros_like(eye[:1]), 2)
        weight = inputs.family.project(inputs.block.attn, eye, 2).double() - bias.double()
        return (weight / scale).cpu(), bias[0].double().cpu()

    @torch.no_grad()
    def matched(self) -> torch.Tensor:
        """Each query prompt's ``topk`` nearest patch positions by key cosine: their mean token, (M, D)."""
        inputs, patches = self.inputs, len(self.tokens)
        if self.topk > patches:
            raise ValueError(
                f"vipamin's topk ({self.topk}) exceeds the {patches} patch tokens of an image; lower "
                f"prompt.init_topk."
            )
        heads = inputs.block.attn.num_heads
        reference = inputs.tokens
        queries = inputs.block.norm1(self.queries.to(reference.device, reference.dtype))
        query_keys = inputs.family.project(inputs.block.attn, queries, 1).double().cpu()
        patch_keys = (self.keys / self.count).reshape(patches, heads, -1).mean(1)
        query_keys = query_keys.reshape(len(queries), heads, -1).mean(1)
        cosine = F.normalize(query_keys, dim=1) @ F.normalize(patch_keys, dim=1).T
        nearest = cosine.topk(self.topk, dim=1).indices  # (M, k)
        return (self.tokens / self.count)[nearest].mean(1)

    @torch.no_grad()
    def orthogonal(self) -> torch.Tensor:
        """The seed prompts whose values are projected off the attention outputs' span, (M, D)."""
        outputs = self.outputs / self.count  # (N, D_attn)
        _, singular, rows = torch.linalg.svd(outputs, full_matrices=False)
        tolerance = singular[0] * max(outputs.shape) * torch.finfo(torch.float32).eps
        basis = rows[singular > tolerance].T  # (D_attn, rank): an orthonormal basis of the span
        if basis.shape[1] == basis.shape[0]:
            warnings.warn(
                f"vipamin: the attention outputs of block {self.inputs.index} span all {len(basis)} "
                f"dimensions ({len(outputs)} tokens per image), so nothing lies outside them and the "
                f"orthogonal part is only the value bias mapped back; prompt.init_lambda 0 keeps the matched "
                f"part.",
                stacklevel=2,
            )
        weight, bias = self._value_map()
        values = self.seeds.double() @ weight + bias
        outside = values - (values @ basis) @ basis.T
        return (outside - bias) @ torch.linalg.pinv(weight)

    def result(self) -> torch.Tensor:
        if self.inputs is None:
            raise ValueError("vipamin read no images for this layer; pass the task's training images.")
        prompts = torch.zeros_like(self.seeds, dtype=torch.float64)
        if self.lam < 1:
            prompts += (1 - self.lam) * self.matched()
        if self.lam > 0:
            prompts += self.lam * self.orthogonal()
        if not math.isfinite(prompts.abs().max().item()):
            raise ValueError("vipamin produced non-finite prompts (a degenerate value projection?).")
        return prompts.float()
