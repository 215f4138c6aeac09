"""Prompt initialisation: VPT's random init, SPT's prototypes of the task's own patch tokens and VIPAMIN."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

from selfprompt.init import methods as _methods  # noqa: F401 (registers the built-in initializers)
from selfprompt.init import vipamin as _vipamin  # noqa: F401 (registers VIPAMIN)
from selfprompt.init.collect import block_inputs, image_batches, patch_tokens_by_layer
from selfprompt.init.registry import (
    PromptInitializer,
    available_initializers,
    get_initializer,
    register_initializer,
)

import torch
from torch import nn

__all__ = ["PromptInitializer", "available_initializers", "init_prompts", "register_initializer"]


@torch.no_grad()
def init_prompts(
    model: nn.Module,
    loader: Iterable | None = None,
    method: str = "sample",
    *,
    fraction: float | None = None,
    max_images: int | None = None,
    seed: int = 0,
    max_tokens: int = 32768,
    options: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Initialise ``model.prompts`` in place and return the new values.

    Token-based methods run the frozen backbone *without prompts* over a seeded subset of the loader's
    images (drawn without replacement, re-read in a fixed order) and build each prompted layer's prompts
    from that layer's patch tokens: the patch embedding for layer 0, block i's input for layer i
    (:func:`patch_tokens_by_layer`). A model whose prompts live in another space says which tokens each
    layer's prompts are built from with a method ``prompt_tokens_by_layer(images, num_layers)`` returning
    one ``(B, H, W, D)`` grid per layer (e.g. CVPT: the post-attention stream of each block).
    Memory stays bounded: at most ``max_tokens`` tokens per layer are kept (k-means), M for the others.
    An initializer that runs the blocks' own attention (``reads_blocks``, e.g. VIPAMIN) reads the whole
    sequence entering each prompted block instead (:func:`block_inputs`).

    Args:
        model: A model with prompts (``prompts`` of shape (layers, M, D), ``num_prompts``,
            ``num_prompt_layers``, ``backbone``, optionally ``prompt_tokens_by_layer``), e.g. a PromptedViT,
            whose prompts are set.
        loader: Batches of the task's training images (use eval transforms); a tensor, an
            ``(images, labels)`` pair or a dict with an ``image``/``pixel_values`` entry per batch.
        method: A registered initializer: see :func:`available_initializers`.
        fraction: Share of the loader's images to use, in (0, 1]; None uses all of them.
        max_images: Cap on the number of images used.
        seed: Seeds the subset, the sampling, k-means and VIPAMIN's draws; the same seed gives the same
            prompts.
        max_tokens: Tokens kept per layer for k-means.
        options: The initializer's own options by keyword (its ``options``; VIPAMIN's ``topk``, ``lam``).
    """
    if not isinstance(getattr(model, "prompts", None), nn.Parameter):
        raise TypeError(f"init_prompts needs a model with prompts, got {type(model).__name__} (it has none).")
    initializer = get_initializer(method)
    rows = model.prompts.shape[1] if model.prompts.dim() == 3 else model.num_prompts
    if rows != model.num_prompts:
        raise ValueError(
            f"{type(model).__name__} holds {rows} rows per layer for its {model.num_prompts} prompts (a "
            f"vocabulary they are picked from): its method initialises them; use "
            f"selfprompt.get_model(backbone, method, num_classes, init_data=loader) or selfprompt train."
        )
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}.")
    if max_tokens < model.num_prompts:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least num_prompts ({model.num_prompts}).")
    options = dict(options or {})
    unknown = sorted(set(options) - set(initializer.options))
    if unknown:
        takes = ", ".join(initializer.options) or "none"
        raise ValueError(f"Prompt init {method!r} has no option {', '.join(unknown)} (its options: {takes}).")
    tokens_by_layer = getattr(model, "prompt_tokens_by_layer", None)
    if initializer.reads_blocks and tokens_by_layer is not None:
        raise ValueError(
            f"Prompt init {method!r} builds each layer's prompts from the sequence entering that block, and "
            f"{type(model).__name__}'s prompts are built from other tokens; use another initializer."
        )
    generator = torch.Generator().manual_seed(seed)
    layers = [
        initializer(model, generator=generator, max_tokens=max_tokens, **options)
        for _ in range(model.num_prompt_layers)
    ]
    if initializer.needs_tokens:
        if loader is None:
            raise ValueError(f"Method {method!r} builds prompts from the task's images: pass a loader.")
        reference = model.prompts
        if tokens_by_layer is None:
            tokens_by_layer = partial(patch_tokens_by_layer, model.backbone)
        seen = 0
        for images in image_batches(loader, fraction, max_images, generator):
            images = images.to(reference.device, reference.dtype)
            if initializer.reads_blocks:
                entering = block_inputs(model.backbone, images, len(layers))
                for layer, inputs in zip(layers, entering, strict=True):
                    layer.update_block(inputs)
            else:
                for layer, tokens in zip(layers, tokens_by_layer(images, len(layers)), strict=True):
                    layer.update(tokens.float())
            seen += len(images)
        if seen == 0:
            raise ValueError(
                f"The loader yielded no images; method {method!r} needs the task's training images."
            )
    prompts = torch.stack([layer.result() for layer in layers])
    model.prompts.copy_(prompts)
    return model.prompts.detach().clone()
