"""K-means in torch: greedy k-means++ seeding, Lloyd iterations, chunked distances, empty clusters re-seeded."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (k, D)
    inertia: float  # sum of squared distances of each point to its nearest center
    iterations: int


def _squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ centers.T + centers.pow(2).sum(1)
    return d2.clamp_min_(0)


def assign(x: torch.Tensor, centers: torch.Tensor, chunk_size: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center of each row and its squared distance, computed ``chunk_size`` rows at a time."""
    labels, dists = [], []
    for chunk in x.split(chunk_size):
        d, i = _squared_distances(chunk, centers).min(dim=1)
        labels.append(i)
        dists.append(d)
    return torch.cat(labels), torch.cat(dists)


def _sample(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` indices drawn with probability proportional to ``weights`` (float64 cumulative sums)."""
    cumulative = weights.double().cumsum(0)
    draws = torch.rand(count, generator=generator, dtype=torch.float64).to(weights.device) * cumulative[-1]
    return torch.searchsorted(cumulative, draws).clamp_max_(len(weights) - 1)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator, chunk_size: int = 16384) -> torch.Tensor:
    """Greedy k-means++ seeding (each step keeps the best of 2 + log k candidates, as scikit-learn does)."""
    trials = 2 + int(math.log(k))
    first = torch.randint(len(x), (1,), generator=generator).to(x.device)
    centers = [x[first]]
    closest = assign(x, centers[0], chunk_size)[1]
    for _ in range(1, k):
        candidates = _sample(closest, trials, generator)
        # potential (total squared distance) if each candidate were added
        candidate_d2 = torch.cat([_squared_distances(c, x[candidates]) for c in x.split(chunk_size)]).T
        new_closest = torch.minimum(closest, candidate_d2)
        best = new_closest.sum(1).argmin()
        centers.append(x[candidates[best]].unsqueeze(0))
        closest = new_closest[best]
    return torch.cat(centers)


def kmeans(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    chunk_size: int = 16384,
) -> KMeansResult:
    """Cluster the rows of ``x`` into ``k`` groups.

    Stops when the total squared center shift falls below ``tol`` times the mean per-feature variance of
    ``x`` (scikit-learn's criterion). A cluster left empty is re-seeded with the point farthest from its
    center.
    """
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}.")
    x = x.float()
    threshold = tol * x.var(dim=0, unbiased=False).mean()
    centers = kmeans_plus_plus(x, k, generator, chunk_size)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        labels, d2 = assign(x, centers, chunk_size)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        new = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        empty = counts == 0
        if empty.any():
            new[empty] = x[d2.topk(int(empty.sum())).indices]
        shift = (new - centers).pow(2).sum()
        centers = new
        if shift <= threshold:
            break
    inertia = assign(x, centers, chunk_size)[1].sum().item()
    return KMeansResult(centers=centers, inertia=inertia, iterations=iterations)
