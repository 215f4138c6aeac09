"""Paired differences with bootstrap intervals, checked against cases with known answers."""

from selfprompt.apps.stats import bootstrap_interval, comparison_table, paired_difference

import numpy as np
import pytest


def cell(variant, task, seed, acc, backbone="b"):
    return {"backbone": backbone, "variant": variant, "task": task, "seed": seed, "test_acc": acc}


def test_a_constant_difference_has_a_point_interval():
    rows = [cell("a", t, s, 0.5 + 0.01 * t) for t in range(4) for s in range(3)]
    rows += [cell("b", t, s, 0.48 + 0.01 * t) for t in range(4) for s in range(3)]
    d = paired_difference(rows, "a", "b")
    assert (d.pairs, d.wins, d.losses) == (12, 12, 0)
    assert d.mean == pytest.approx(2.0) and d.low == pytest.approx(2.0) and d.high == pytest.approx(2.0)


def test_the_interval_of_a_normal_sample_matches_the_normal_theory():
    """n = 400 draws of N(0.5, 1): the 95% interval of the mean is about 0.5 +- 1.96 / 20."""
    values = np.random.default_rng(1).normal(0.5, 1.0, 400)
    low, high = bootstrap_interval(values, resamples=20_000)
    centre, half = values.mean(), 1.96 * values.std(ddof=1) / 20
    assert low == pytest.approx(centre - half, abs=0.01) and high == pytest.approx(centre + half, abs=0.01)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)  # seeded


def test_only_shared_cells_are_paired_and_ties_are_counted():
    rows = [cell("a", 0, 0, 0.6), cell("b", 0, 0, 0.6), cell("a", 1, 0, 0.7), cell("b", 1, 0, 0.5)]
    rows += [cell("a", 2, 0, 0.9)]  # b did not run task 2: not a pair
    d = paired_difference(rows, "a", "b")
    assert (d.pairs, d.wins, d.losses) == (2, 1, 0)
    assert "a wins 1, loses 0, ties 1" in d.describe()
    with pytest.raises(ValueError, match="share no cell"):
        paired_difference(rows, "a", "c")


def test_the_table_pairs_each_backbone_separately():
    rows = [
        cell(v, 0, s, acc, bb) for bb in ("x", "y") for s in (0, 1) for v, acc in (("a", 0.6), ("b", 0.5))
    ]
    table = comparison_table(rows)
    assert "| x | a - b | 2 | +10.00 |" in table and "| y | a - b | 2 | +10.00 |" in table
