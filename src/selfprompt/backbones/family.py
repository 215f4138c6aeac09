"""A backbone family: the functions through which the rest of selfprompt reaches a timm architecture's
internals (its token prologue, the tokens entering each block, its Attention's steps), looked up by the
backbone's class. Each family is one module of this package with the same names (``vit.py`` for timm's
``VisionTransformer``, ``eva.py`` for ``Eva``, ``beit.py`` for ``Beit``, ``swin.py`` for
``SwinTransformer``); adding one is a module and one entry in ``_MODULES``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any

from selfprompt.backbones import beit, eva, swin, vit

import torch
from torch import nn

Tensor = torch.Tensor


@dataclass(frozen=True)
class BackboneFamily:
    """One family's internals; every function takes the backbone (prologue, blocks) or one of its attention
    modules first. See :mod:`selfprompt.backbones.vit` for what each computes.

    Attributes:
        name: Short name (``vit``).
        model_class, block_class, attention_class: The timm classes the functions follow.
        examples: timm names of the family, for error messages.
        blocks_path: Where the blocks the classifier runs one after the other are (``blocks``; Swin's
            stages: ``layers``).
        capabilities: What methods may rely on: ``prompts`` (tokens inserted after the prefix, with no
            position), ``branches`` (a block's attention and MLP branches replaceable:
            :func:`residual_branches`),
            ``attention`` (methods that compute the attention themselves from its steps, with the family's
            positions: :func:`place`), ``key_value_prompts`` (E2VPT's prompts shaped by the attention's
            heads), ``serving`` (the multi-task server runs it). Methods that change
            Linear layers, biases or the head need none of them.
        lacks: For each capability it has not, why (a sentence fragment for refusals).
        linears: The Linear layers of a block by canonical name (``qkv``, ``attn.proj``, ``mlp.fc1``,
            ``mlp.fc2``), as regular expressions of their paths inside the block.
    """

    name: str
    model_class: type[nn.Module]
    block_class: type[nn.Module]
    attention_class: type[nn.Module]
    examples: str
    blocks_path: str
    capabilities: frozenset[str]
    lacks: dict[str, str]
    linears: dict[str, str]
    # the token prologue and the blocks
    embed_patches: Callable[[nn.Module, Tensor], Tensor]
    patch_grid: Callable[[nn.Module, Tensor, Tensor], tuple[int, int]]
    embed_tokens: Callable[..., Tensor]
    pre_blocks: Callable[[nn.Module, Tensor], Tensor]
    prologue: Callable[..., Tensor]
    tokens_entering_blocks: Callable[..., Iterator[tuple[nn.Module, Tensor]]]
    positions: Callable[[nn.Module, Tensor], Any]
    run_block: Callable[..., Tensor]
    residual_branches: Callable[..., Tensor]
    final_norms: Callable[[nn.Module], tuple[nn.Module, nn.Module]]
    # the layers methods change
    block_ops: Callable[[nn.Module], tuple[str, ...]]
    plain_linears: Callable[[nn.Module], None]
    # the attention's steps
    optional_part: Callable[[nn.Module, str], nn.Module | None]
    qkv_rows: Callable[[nn.Module, int], slice]
    project: Callable[..., Tensor]
    split_heads: Callable[[nn.Module, Tensor], Tensor]
    norm_qk: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
    place: Callable[..., tuple[Tensor, Tensor, Tensor | None]]
    attend: Callable[..., Tensor]
    merge_heads: Callable[[nn.Module, Tensor], Tensor]
    attention_output: Callable[[nn.Module, Tensor, Tensor], Tensor]
    attention: Callable[[nn.Module, Tensor], Tensor]

    def blocks(self, backbone: nn.Module) -> nn.Module:
        """``backbone``'s blocks (a ModuleList or Sequential), in the order they run."""
        return backbone.get_submodule(self.blocks_path)

    def missing(self, needs: frozenset[str]) -> str | None:
        """Why this family cannot give what ``needs`` names, or None when it gives all of it."""
        reasons = [self.lacks.get(need, f"it has no {need!r}") for need in sorted(needs - self.capabilities)]
        return "; ".join(reasons) or None

    @classmethod
    def of(cls, module: ModuleType) -> BackboneFamily:
        """The family a module defines: its functions by these names, its constants in upper case (``NAME``,
        ``MODEL_CLASS``, ...); a missing one fails here, at import."""
        return cls(
            **{
                f.name: getattr(module, f.name if f.type.startswith("Callable") else f.name.upper())
                for f in fields(cls)
            }
        )


_MODULES: tuple[ModuleType, ...] = (vit, eva, beit, swin)
BACKBONE_FAMILIES: tuple[BackboneFamily, ...] = tuple(BackboneFamily.of(m) for m in _MODULES)


def _supported() -> str:
    return ", ".join(f"{f.model_class.__name__} ({f.examples})" for f in BACKBONE_FAMILIES)


def backbone_family_refusal(backbone: nn.Module) -> str:
    """Why ``backbone``'s class has no family, naming the supported ones."""
    return (
        f"selfprompt supports timm {_supported()} backbones, got {type(backbone).__name__}. "
        f"Convolutional models (ResNet, ConvNeXt, ...) have no token sequence."
    )


def backbone_family(backbone: nn.Module) -> BackboneFamily:
    """The family of ``backbone`` (an instance of its model class or a subclass); refuses any other class,
    naming the supported ones."""
    for family in BACKBONE_FAMILIES:
        if isinstance(backbone, family.model_class):
            return family
    raise TypeError(backbone_family_refusal(backbone))


def attention_family(attn: nn.Module) -> BackboneFamily | None:
    """The family whose attention decomposition computes ``attn`` (an instance of its attention class), or
    None."""
    for family in BACKBONE_FAMILIES:
        if isinstance(attn, family.attention_class):
            return family
    return None
