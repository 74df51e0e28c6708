"""Successive halving (decide.search, Optuna's SuccessiveHalvingPruner): on synthetic LR curves the
true best LR is among the survivors of every rung and wins; a rung keeps at most ceil(n / r); a failed
run is pruned; the search replays the same way from the same losses."""

from __future__ import annotations

import math

import numpy as np
import pytest

from adaptlab.decide.search import prior_first, successive_halving, survivors


def _grid(k: int) -> list[float]:
    return [1e-4 * math.sqrt(10) ** (i - k // 2) for i in range(k)]


def _objective(best: float, noise: float, rng: np.random.Generator):
    """Validation loss of a run at LR lr and rung k: a bowl in log LR, lower with budget, plus noise
    smaller than the gap between grid neighbours (so the true best is the best at every rung)."""

    def loss(lr: float, k: int) -> float:
        return 2.0 + 0.3 * math.log10(lr / best) ** 2 + 1.0 / (k + 1) + noise * rng.standard_normal()

    return loss


@pytest.mark.parametrize("order", ["prior_first", "ascending", "descending", "shuffled"])
@pytest.mark.parametrize("k,rungs,eta", [(8, 3, 2), (4, 2, 2), (6, 3, 3), (3, 2, 2)])
def test_true_best_survives_every_rung_and_wins(order: str, k: int, rungs: int, eta: int) -> None:
    rng = np.random.default_rng(k * 10 + rungs)
    for trial in range(10):
        grid = _grid(k)
        best = grid[int(rng.integers(0, k))]
        loss = _objective(best, noise=0.01, rng=rng)
        cands = {
            "prior_first": prior_first(grid, grid[k // 2]),
            "ascending": sorted(grid),
            "descending": sorted(grid, reverse=True),
            "shuffled": list(rng.permutation(grid)),
        }[order]
        seen: list[list[float]] = []

        def train(alive: list[float], rung: int, seen=seen, loss=loss) -> dict[float, float | None]:
            seen.append(list(alive))
            return {lr: loss(lr, rung) for lr in alive}

        s = successive_halving([float(c) for c in cands], rungs, train, eta)
        assert s.best == pytest.approx(best), (order, trial)
        for alive in seen:
            assert any(lr == pytest.approx(best) for lr in alive)
        for before, after in zip(seen, seen[1:]):
            assert len(after) <= survivors(len(before), eta)


def test_a_rung_keeps_the_best_fraction_not_everything() -> None:
    """Ascending LRs toward the optimum: the asynchronous rule alone promotes almost every trial (each
    is the best so far); the cap keeps a rung at ceil(n / r)."""
    grid = _grid(8)
    calls = []

    def train(alive: list[float], rung: int) -> dict[float, float | None]:
        calls.append(len(alive))
        return {lr: abs(math.log(lr / grid[-1])) + rung for lr in alive}

    s = successive_halving(grid, 3, train, 2)
    assert calls == [8, 4, 2]
    assert s.best == grid[-1]


def test_failed_and_diverged_runs_are_pruned() -> None:
    grid = _grid(4)

    def train(alive: list[float], rung: int) -> dict[float, float | None]:
        return {lr: (None if lr == grid[0] else math.inf if lr == grid[1] else lr * 1e3) for lr in alive}

    s = successive_halving(grid, 2, train, 2)
    assert grid[0] not in s.promoted[0] and grid[1] not in s.promoted[0]
    assert s.best == grid[2]


def test_every_run_failing_leaves_no_best() -> None:
    s = successive_halving(_grid(3), 2, lambda alive, k: {lr: None for lr in alive}, 2)
    assert s.best is None and s.promoted == [[]]


def test_the_search_replays_identically_from_the_same_losses() -> None:
    rng = np.random.default_rng(3)
    table = {(lr, k): float(rng.normal()) for lr in _grid(6) for k in range(3)}

    def train(alive: list[float], rung: int) -> dict[float, float | None]:
        return {lr: table[(lr, rung)] for lr in alive}

    a = successive_halving(_grid(6), 3, train, 2)
    b = successive_halving(_grid(6), 3, train, 2)
    assert a.as_dict() == b.as_dict()


def test_prior_first_orders_by_distance_on_a_log_scale() -> None:
    assert prior_first([1e-5, 1e-4, 1e-3, 1e-2], 1e-4) == [1e-4, 1e-3, 1e-5, 1e-2]
