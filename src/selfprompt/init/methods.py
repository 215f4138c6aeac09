"""Built-in initializers: VPT's ``xavier``; SPT's ``sample``, ``mean_pool``, ``max_pool`` and ``kmeans``."""

from __future__ import annotations

import math

from selfprompt.init.kmeans import kmeans
from selfprompt.init.registry import PromptInitializer, register_initializer
from selfprompt.init.reservoir import Reservoir

import torch
import torch.nn.functional as F


@register_initializer("xavier")
class XavierInit(PromptInitializer):
    """VPT: uniform in +-sqrt(6 / (in_chans * patch_area + D)); uses no data."""

    needs_tokens = False

    def __init__(self, model, *, generator, max_tokens):
        super().__init__(model, generator=generator, max_tokens=max_tokens)
        self.shape = (model.num_prompts, model.embed_dim)
        self.bound = model.xavier_bound()

    def result(self) -> torch.Tensor:
        return (torch.rand(self.shape, generator=self.generator) * 2 - 1) * self.bound


class _ReservoirInit(PromptInitializer):
    """Keeps a uniform random sample of candidate vectors; the prompts are built from it."""

    capacity_is_max_tokens = False

    def __init__(self, model, *, generator, max_tokens):
        super().__init__(model, generator=generator, max_tokens=max_tokens)
        capacity = max_tokens if self.capacity_is_max_tokens else self.num_prompts
        self.reservoir = Reservoir(capacity, generator)

    def candidates(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.flatten(0, 2)

    def update(self, tokens: torch.Tensor) -> None:
        self.reservoir.add(self.candidates(tokens))

    def sampled(self) -> torch.Tensor:
        rows = self.reservoir.rows
        if rows is None or len(rows) < self.num_prompts:
            raise ValueError(
                f"Only {self.reservoir.seen} patch tokens were collected for {self.num_prompts} prompts; "
                f"use more images (fraction / max_images) or fewer prompts."
            )
        return rows


@register_initializer("sample")
class SampleInit(_ReservoirInit):
    """SPT: M distinct patch tokens drawn uniformly from all collected tokens (the paper's default)."""

    def result(self) -> torch.Tensor:
        return self.sampled()


def pooling_grid(num_windows: int, height: int, width: int) -> tuple[int, int]:
    """The factorisation rows x cols = num_windows whose aspect ratio is closest to the token grid's."""
    pairs = [(r, num_windows // r) for r in range(1, num_windows + 1) if num_windows % r == 0]
    target = math.log(height / width)
    return min(pairs, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - target), rc[0] > height or rc[1] > width))


class _PoolInit(_ReservoirInit):
    """SPT pooling: each image's token grid pooled over M 2-D windows, then M pooled vectors sampled.

    Fixes the official 1-D raster windows: windows tile the 2-D grid (adaptive pooling, every token in some
    window, no window empty), M = 1 is the global pool and M larger than the grid repeats tokens.
    """

    pool = staticmethod(F.adaptive_avg_pool2d)

    def candidates(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = pooling_grid(self.num_prompts, tokens.shape[1], tokens.shape[2])
        pooled = self.pool(tokens.permute(0, 3, 1, 2), grid)  # (B, D, rows, cols)
        return pooled.flatten(2).transpose(1, 2).flatten(0, 1)

    def result(self) -> torch.Tensor:
        return self.sampled()


@register_initializer("mean_pool")
class MeanPoolInit(_PoolInit):
    pool = staticmethod(F.adaptive_avg_pool2d)


@register_initializer("max_pool")
class MaxPoolInit(_PoolInit):
    pool = staticmethod(F.adaptive_max_pool2d)


@register_initializer("kmeans")
class KMeansInit(_ReservoirInit):
    """SPT prototypes: k-means centres (k = M) of up to ``max_tokens`` uniformly sampled patch tokens."""

    capacity_is_max_tokens = True

    def result(self) -> torch.Tensor:
        return kmeans(self.sampled(), self.num_prompts, self.generator).centers
