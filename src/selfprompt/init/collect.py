"""Streaming the frozen backbone's patch tokens, layer by layer, over a seeded subset of a loader's images."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from itertools import islice
from typing import Any

from selfprompt.backbones import backbone_family

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset

_IMAGE_KEYS = ("image", "images", "pixel_values", "img")


def batch_images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: the batch itself, its first element, or its image entry."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in _IMAGE_KEYS:
            if key in batch:
                return batch[key]
    raise TypeError(
        f"Cannot find images in a batch of type {type(batch).__name__}: expected a tensor, an "
        f"(images, labels) pair or a dict with one of the keys {_IMAGE_KEYS}."
    )


def _subset_size(total: int, fraction: float | None, max_images: int | None) -> int:
    count = total if fraction is None else max(1, round(fraction * total))
    return count if max_images is None else min(count, max_images)


def image_batches(
    loader: Iterable,
    fraction: float | None,
    max_images: int | None,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """Image batches of a seeded subset, drawn without replacement.

    A ``DataLoader`` over a map-style dataset is re-read in index order over the chosen subset (same batch
    size, workers and collate function), so the result does not depend on its shuffling. Any other iterable
    of batches is read as it comes; it supports ``max_images`` but not ``fraction``.
    """
    dataset = getattr(loader, "dataset", None)
    if (
        isinstance(loader, DataLoader)
        and isinstance(dataset, Sized)
        and not isinstance(dataset, IterableDataset)
    ):
        count = _subset_size(len(dataset), fraction, max_images)
        chosen = torch.randperm(len(dataset), generator=generator)[:count].sort().values
        loader = DataLoader(
            Subset(dataset, chosen.tolist()),
            batch_size=loader.batch_size or 32,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )
        yield from map(batch_images, loader)
        return
    if fraction is not None:
        raise ValueError(
            "fraction needs a DataLoader over a map-style dataset (with a length) to draw its subset; "
            "pass such a loader, or max_images to take the first images of this stream."
        )
    remaining = max_images
    for batch in loader:
        images = batch_images(batch)
        if remaining is not None:
            images = images[:remaining]
            remaining -= len(images)
        if len(images):
            yield images
        if remaining == 0:
            return


@torch.no_grad()
def patch_tokens_by_layer(
    backbone: VisionTransformer, images: torch.Tensor, num_layers: int
) -> list[torch.Tensor]:
    """Patch tokens, prefix tokens excluded, as SPT draws prompts from, each shaped ``(B, H, W, D)``.

    Layer 0 is the patch embedding output (no position embedding, as in the official code); layer i >= 1 is
    the patch part of block i's input, i.e. block i-1's output. Only the blocks needed are run.
    """
    family = backbone_family(backbone)
    x = family.embed_patches(backbone, images)
    grid = family.patch_grid(backbone, images, x)
    batch = x.shape[0]
    layers = [x.reshape(batch, *grid, -1)]
    if num_layers > 1:
        first = family.pre_blocks(backbone, family.embed_tokens(backbone, x))
        where = family.positions(backbone, images)
        for _, h in islice(family.tokens_entering_blocks(backbone, first, num_layers, where), 1, None):
            layers.append(h[:, backbone.num_prefix_tokens :].reshape(batch, *grid, -1))
    return layers


@dataclass
class BlockInput:
    """The whole sequence entering one prompted block of the frozen backbone, with what runs it.

    Attributes:
        tokens: ``(B, prefix + H*W, D)`` in the backbone's dtype: the prologue's output for block 0 (prefix
            tokens and position embedding), block i-1's output for block i.
        block: The block these tokens enter.
        index: Its position among the blocks.
        prefix: Prefix tokens (class token, registers) at the start of ``tokens``.
        positions: The family's positions of the images (what ``family.place`` takes).
        family: The backbone's :class:`~selfprompt.backbones.BackboneFamily`.
    """

    tokens: torch.Tensor
    block: nn.Module
    index: int
    prefix: int
    positions: Any
    family: Any


@torch.no_grad()
def block_inputs(backbone: nn.Module, images: torch.Tensor, num_layers: int) -> list[BlockInput]:
    """What enters each of the first ``num_layers`` blocks when ``images`` run through the frozen backbone
    without prompts (only the blocks needed are run)."""
    family = backbone_family(backbone)
    x = family.embed_patches(backbone, images)
    first = family.pre_blocks(backbone, family.embed_tokens(backbone, x))
    where = family.positions(backbone, images)
    return [
        BlockInput(h, block, index, backbone.num_prefix_tokens, where, family)
        for index, (block, h) in enumerate(family.tokens_entering_blocks(backbone, first, num_layers, where))
    ]
