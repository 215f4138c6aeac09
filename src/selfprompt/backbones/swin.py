"""The internals of timm's ``SwinTransformer`` family, with the names of :mod:`selfprompt.backbones.vit`.

Swin has no token sequence to prompt: its blocks attend within shifted windows of a patch grid that halves
between stages, and it has no class token. The classifier runs its stages as its "blocks" (``layers``: each
stage downsamples, then runs its blocks) on the ``(B, H, W, C)`` grid, then the final norm, and pools the
mean of the grid; the methods that change Linear layers, biases or the head run on it. The token and
attention steps the other families have are refused here, naming why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from selfprompt.backbones import vit
from selfprompt.backbones.eva import block_ops

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage, WindowAttention
from torch import nn

NAME = "swin"
MODEL_CLASS = SwinTransformer
BLOCK_CLASS = SwinTransformerStage
ATTENTION_CLASS = WindowAttention
EXAMPLES = "swin_* made by timm.create_model"
BLOCKS_PATH = "layers"
CAPABILITIES: frozenset[str] = frozenset()
_NO_SEQUENCE = (
    "its windowed attention runs on a patch grid that shrinks between stages, with no class token: there is "
    "no token sequence to insert prompts into"
)
LACKS = {
    "prompts": _NO_SEQUENCE,
    "attention": _NO_SEQUENCE,
    "key_value_prompts": _NO_SEQUENCE,
    "branches": "its blocks shift and partition windows around their attention and sit inside stages; "
    "the methods that replace a block's branches do not follow them",
    "serving": "the multi-task server batches token sequences; serve its adapters one model at a time "
    "(selfprompt.load_pretrained)",
}
#: Inside a stage (``layers.<i>``): its blocks' Linear layers.
LINEARS = {
    "qkv": r"blocks\.\d+\.attn\.qkv",
    "attn.proj": r"blocks\.\d+\.attn\.proj",
    "mlp.fc1": r"blocks\.\d+\.mlp\.fc1",
    "mlp.fc2": r"blocks\.\d+\.mlp\.fc2",
}


def _refuse(*_args: object, **_kwargs: object) -> torch.Tensor:
    raise TypeError(f"timm's SwinTransformer has no token sequence: {_NO_SEQUENCE}.")


# --- the grid prologue ------------------------------------------------------------------------------------


def embed_patches(backbone: SwinTransformer, images: torch.Tensor) -> torch.Tensor:
    """timm's ``patch_embed``: ``(B, H, W, C)``."""
    return backbone.patch_embed(images)


patch_grid = vit.patch_grid


def embed_tokens(backbone: SwinTransformer, patches: torch.Tensor, patch_drop: bool = True) -> torch.Tensor:
    """The grid as it enters the first stage (Swin adds no position embedding here)."""
    return patches


def pre_blocks(backbone: SwinTransformer, x: torch.Tensor) -> torch.Tensor:
    """Nothing runs between the patch embedding and the first stage."""
    return x


def prologue(
    backbone: SwinTransformer,
    images: torch.Tensor,
    insert: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The grid entering the first stage; an ``insert`` that changes it is refused."""
    x = embed_tokens(backbone, embed_patches(backbone, images))
    if insert is not None and insert(x) is not x:
        _refuse()
    return pre_blocks(backbone, x)


def positions(backbone: SwinTransformer, images: torch.Tensor | None = None) -> None:
    """Swin's stages compute their own windows and relative position bias."""
    return None


def run_block(stage: nn.Module, x: torch.Tensor, positions: None = None, index: int = 0) -> torch.Tensor:
    """Stage ``index`` on the grid: timm's own forward (downsampling, then its blocks)."""
    return stage(x)


def residual_branches(block: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    raise TypeError(f"timm's SwinTransformer: {LACKS['branches']}.")


def tokens_entering_blocks(
    backbone: SwinTransformer, x: torch.Tensor, num_blocks: int | None = None, positions: None = None
) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """``(stage, grid entering it)`` for the first ``num_blocks`` stages."""
    return vit.walk_blocks(backbone.layers[:num_blocks], x, lambda stage, h, _: stage(h))


def final_norms(backbone: SwinTransformer) -> tuple[nn.Module, nn.Module]:
    """The final norm on the grid, and none after pooling."""
    return backbone.norm, nn.Identity()


def plain_linears(backbone: nn.Module) -> None:
    """Nothing to do: Swin's blocks call every Linear as a module."""


# --- no attention steps -----------------------------------------------------------------------------------

optional_part = qkv_rows = project = split_heads = norm_qk = place = attend = merge_heads = _refuse
attention_output = attention = _refuse

__all__ = ["block_ops"]
