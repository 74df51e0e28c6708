"""The LR study's fit: the optimum of validation loss against log10(LR) from a grid, a best LR on the
grid's edge reported as a bound, and the bootstrap interval of the ratio of two arms' optima.

    python -m pytest -q tests/unit/test_lr_fit.py
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaptlab.compare.lr_fit import fit_optimum, lr_ratio

GRID = [1e-5 * f for f in (0.3, 1, 3, 10, 30, 100, 300)]


def curves(optimum: float, seeds: int, noise: float, rng: np.random.Generator, lrs: list[float] = GRID):
    """Validation loss quadratic in log10(LR) with its minimum at `optimum`, plus noise, per seed."""
    x = np.log10(lrs)
    clean = 2.0 + 0.3 * (x - math.log10(optimum)) ** 2
    return clean + noise * rng.standard_normal((seeds, len(lrs)))


def test_fit_recovers_a_known_optimum_between_grid_points() -> None:
    rng = np.random.default_rng(0)
    for true in (2.2e-5, 7e-5, 4.1e-4):
        (row,) = curves(true, 1, 0.0, rng)
        fit = fit_optimum(GRID, list(row))
        assert fit.edge is None and fit.lr == pytest.approx(true, rel=1e-6)
        noisy = curves(true, 20, 0.01, rng)  # half-decade steps: a little noise moves it a little
        fits = [fit_optimum(GRID, list(r)).lr for r in noisy]
        assert abs(np.median(np.log10(fits)) - math.log10(true)) < 0.1


def test_a_minimum_on_the_grid_edge_is_reported_as_a_bound() -> None:
    rng = np.random.default_rng(1)
    (low,) = curves(1e-7, 1, 0.0, rng)
    (high,) = curves(1e-1, 1, 0.0, rng)
    assert fit_optimum(GRID, list(low)).edge == "low" and fit_optimum(GRID, list(low)).lr == GRID[0]
    assert fit_optimum(GRID, list(high)).edge == "high" and fit_optimum(GRID, list(high)).lr == GRID[-1]


def test_a_diverged_neighbour_keeps_the_best_grid_point() -> None:
    losses = [3.0, 2.5, 2.0, math.inf, math.nan, math.inf, math.inf]
    fit = fit_optimum(GRID, losses)
    assert fit.edge is None and fit.lr == GRID[2]


def test_the_ratio_interval_covers_the_true_ratio() -> None:
    rng = np.random.default_rng(2)
    true_full, true_lora = 3e-5, 4e-4  # a ratio of 13.3, between grid points
    covered = 0
    for _ in range(10):
        full, lora = curves(true_full, 6, 0.02, rng), curves(true_lora, 6, 0.02, rng)
        record, opt_full, opt_lora = lr_ratio(("full", "lora"), (GRID, full), (GRID, lora))
        lo, hi = record["interval"]
        covered += lo <= true_lora / true_full <= hi
        assert lo <= record["estimate"] <= hi and not record["edge"] and record["seeds"] == 6
        assert len(record["per_seed"]) == 6 and len(opt_full["per_seed"]) == 6
        assert record["estimate"] == pytest.approx(opt_lora["fitted"] / opt_full["fitted"])
    assert covered >= 8


def test_one_seed_is_unreplicated_and_an_edge_makes_the_ratio_a_bound() -> None:
    rng = np.random.default_rng(3)
    record, _, opt_lora = lr_ratio(
        ("full", "lora"), (GRID, curves(3e-5, 1, 0.0, rng)), (GRID, curves(1.0, 1, 0.0, rng))
    )
    assert record["interval"] is None and "unreplicated" in record["note"]
    assert (
        record["edge"] and opt_lora["edge"] and "lora's best LR is on the grid's high edge" in record["note"]
    )
