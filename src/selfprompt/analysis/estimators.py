"""Normalised mutual information between two vectors, their coordinates taken as paired samples.

This estimator is selfprompt's own reconstruction: the SPT paper reports the NMI between prompts and patch
tokens without saying how it estimated it. Two D-vectors ``a`` and ``b`` are read as D paired samples
``(a_d, b_d)``; each vector is cut into ``bins`` equal-frequency (quantile) bins of its own coordinates, and
the mutual information of the two bin labellings is computed from their D x ``bins`` x ``bins`` contingency
table, as scikit-learn's ``normalized_mutual_info_score`` does on labels.

The plug-in MI of D samples is biased upwards: independent vectors with D = 128 coordinates and 32 bins
score an NMI near 1. Two choices keep independent noise near 0:

- ``bins`` defaults to ``floor(sqrt(D / 5))`` (5 bins for D = 128, 12 for D = 768), so that each cell of
  the table expects at least 5 pairs under independence;
- the result is adjusted for chance (Vinh, Epps and Bailey, JMLR 2010; scikit-learn's
  ``adjusted_mutual_info_score`` with ``average_method="geometric"``): ``(I - E[I]) / (H - E[I])``, with
  ``E[I]`` the exact expected MI of two random labellings with these bin sizes. Quantile bins give every
  vector the same bin sizes, so ``E[I]`` and ``H`` are one pair of constants per (D, bins).

Identical vectors (or any strictly increasing function of one another) score exactly 1, independent ones 0
in expectation (single pairs scatter around it, by about 0.03 for D = 128), and the score falls as noise is
added.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


def default_bins(dim: int) -> int:
    """``floor(sqrt(dim / 5))``, at least 2: at least 5 expected pairs per contingency cell."""
    return max(2, math.isqrt(dim // 5))


def quantile_bins(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-frequency bin of each coordinate of the vectors in the last dimension: ``rank * bins // D``.

    Ties are broken by position (a stable sort), so every vector gets the same bin sizes.
    """
    dim = x.shape[-1]
    order = x.argsort(dim=-1, stable=True)
    positions = torch.arange(dim, device=x.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)
    return ranks * bins // dim


def bin_sizes(dim: int, bins: int) -> torch.Tensor:
    """How many of ``dim`` coordinates fall in each quantile bin."""
    return torch.bincount(torch.arange(dim) * bins // dim, minlength=bins)


def expected_mutual_information(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact expected MI (nats) of two random labellings of ``n = a.sum()`` items with cluster sizes ``a``
    and ``b`` (the hypergeometric model of Vinh et al., 2010)."""
    a, b = a.double(), b.double()
    n = a.sum()
    ai, bj = a[:, None, None], b[None, :, None]
    nij = torch.arange(1, int(torch.minimum(a.max(), b.max())) + 1, dtype=torch.float64)[None, None, :]
    valid = (nij >= ai + bj - n) & (nij <= torch.minimum(ai, bj))
    log_p = (
        torch.lgamma(ai + 1) + torch.lgamma(bj + 1) + torch.lgamma(n - ai + 1) + torch.lgamma(n - bj + 1)
        - torch.lgamma(n + 1) - torch.lgamma(nij + 1) - torch.lgamma(ai - nij + 1)
        - torch.lgamma(bj - nij + 1) - torch.lgamma((n - ai - bj + nij).clamp_min(0) + 1)
    )  # fmt: skip
    terms = nij / n * torch.log(n * nij / (ai * bj)) * log_p.exp()
    return terms.where(valid, torch.zeros(())).sum().item()


@lru_cache(maxsize=64)
def _constants(dim: int, bins: int) -> tuple[float, float]:
    """Entropy of the quantile labelling and the expected MI of two of them, for (dim, bins)."""
    sizes = bin_sizes(dim, bins)
    p = sizes.double() / dim
    entropy = -torch.xlogy(p, p).sum().item()
    return entropy, expected_mutual_information(sizes, sizes)


def pairwise_nmi(
    a: torch.Tensor, b: torch.Tensor, bins: int | None = None, adjusted: bool = True
) -> torch.Tensor:
    """NMI of every vector of ``a`` with every vector of ``b`` (see the module docstring).

    Args:
        a: Shape ``(..., P, D)``.
        b: Shape ``(..., N, D)``; leading dimensions broadcast with ``a``'s.
        bins: Quantile bins per vector; None picks :func:`default_bins`.
        adjusted: Adjust for chance (independent vectors score 0 in expectation). False gives the plug-in
            ``I / sqrt(H(a) H(b))``, biased upwards for small D.

    Returns:
        Shape ``(..., P, N)``: 1 for vectors with the same ordering of coordinates.
    """
    dim = a.shape[-1]
    if b.shape[-1] != dim:
        raise ValueError(f"a and b must have the same vector length, got {a.shape[-1]} and {b.shape[-1]}.")
    bins = default_bins(dim) if bins is None else bins
    if not 2 <= bins <= dim:
        raise ValueError(f"bins must be in [2, {dim}] (the vector length), got {bins}.")
    one_hot_a = F.one_hot(quantile_bins(a, bins), bins).to(torch.float32)
    one_hot_b = F.one_hot(quantile_bins(b, bins), bins).to(torch.float32)
    joint = torch.einsum("...pdi,...ndj->...pnij", one_hot_a, one_hot_b) / dim
    entropy, expected = _constants(dim, bins)
    # the marginals are the fixed bin sizes, so I = H(a) + H(b) - H(a, b) = 2 H + sum p log p
    mutual = 2 * entropy + torch.xlogy(joint, joint).sum(dim=(-2, -1))
    if adjusted:
        return (mutual - expected) / (entropy - expected)
    return mutual / entropy
