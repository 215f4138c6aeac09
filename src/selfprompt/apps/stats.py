"""Paired comparisons of two methods over the same cells (backbone x task x seed): the mean difference in
test accuracy with a bootstrap confidence interval, and the win count.

The pairs are the cells both methods ran; the interval resamples those pairs with replacement (percentile
bootstrap, seeded), so it describes the spread of the mean difference over this set of tasks and seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over ``pairs`` paired cells, in accuracy points."""

    a: str
    b: str
    pairs: int
    mean: float
    low: float
    high: float
    wins: int  # cells where a beats b
    losses: int
    level: float = 0.95

    def describe(self) -> str:
        percent = round(100 * self.level)
        return (
            f"{self.a} - {self.b}: {self.mean:+.2f} points [{percent}% CI {self.low:+.2f}, {self.high:+.2f}] "
            f"over {self.pairs} paired cells; {self.a} wins {self.wins}, loses {self.losses}, "
            f"ties {self.pairs - self.wins - self.losses}"
        )


def bootstrap_interval(
    values: np.ndarray, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("no paired values to bootstrap.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def paired_difference(
    rows: list[dict[str, Any]], a: str, b: str, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> PairedDifference:
    """Compare variants ``a`` and ``b`` on the cells (``backbone``, ``task``, ``seed``) both ran;
    ``rows`` are bench cell records (``variant``, ``test_acc`` in [0, 1])."""
    by_variant: dict[str, dict[tuple, float]] = {a: {}, b: {}}
    for r in rows:
        if r["variant"] in by_variant:
            by_variant[r["variant"]][(r["backbone"], r["task"], r["seed"])] = 100 * r["test_acc"]
    shared = sorted(by_variant[a].keys() & by_variant[b].keys())
    if not shared:
        known = sorted({r["variant"] for r in rows})
        raise ValueError(f"{a} and {b} share no cell (backbone, task, seed); variants run: {known}.")
    diffs = np.array([by_variant[a][k] - by_variant[b][k] for k in shared])
    low, high = bootstrap_interval(diffs, resamples, level, seed)
    return PairedDifference(
        a,
        b,
        len(diffs),
        float(diffs.mean()),
        low,
        high,
        int((diffs > 0).sum()),
        int((diffs < 0).sum()),
        level,
    )


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: every pair of variants (in the order they appear) that share cells, per backbone."""
    lines = [
        "| backbone | a - b | pairs | mean (points) | 95% CI | a wins / losses / ties |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        cells = {v: {(r["task"], r["seed"]) for r in mine if r["variant"] == v} for v in variants}
        for i, a in enumerate(variants):
            for b in variants[i + 1 :]:
                if not cells[a] & cells[b]:
                    continue
                d = paired_difference(mine, a, b)
                ties = d.pairs - d.wins - d.losses
                lines.append(
                    f"| {backbone} | {a} - {b} | {d.pairs} | {d.mean:+.2f} | [{d.low:+.2f}, {d.high:+.2f}] | "
                    f"{d.wins} / {d.losses} / {ties} |"
                )
    return "\n".join(lines)
