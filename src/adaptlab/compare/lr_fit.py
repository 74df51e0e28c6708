"""The LR study's numbers: each arm's fitted best LR and the ratio of two arms' best LRs, with an interval.

Validation loss is fitted against log10(LR) by a parabola through the grid's best point and its two
neighbours; its vertex is the fitted optimum. A best point on the grid's edge has no neighbour on one side:
the optimum is then that edge LR, reported as a bound (`edge`), not an estimate. The ratio's interval
bootstraps over seeds (seed s of both arms saw the same data order, so seeds are resampled in pairs);
validation losses are kept per run as one mean, so seeds are the only replicates to resample.

    python -c "from adaptlab.compare.lr_fit import fit_optimum; print(fit_optimum([1, 10, 100], [2, 1, 2]))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAPS = 2000


@dataclass(frozen=True)
class Optimum:
    lr: float
    edge: str | None  # "low" / "high": the best LR is the grid's lowest / highest (a bound, not an estimate)


def fit_optimum(lrs: list[float], losses: list[float]) -> Optimum:
    """The LR at the vertex of the parabola in log10(LR) through the lowest loss and its two neighbours.

    A non-finite loss (a diverged run) counts as worse than every finite one. Without a finite neighbour on
    both sides, or without upward curvature, the best grid LR itself is returned."""
    order = np.argsort(lrs)
    grid = np.asarray(lrs, dtype=float)[order]
    x = np.log10(grid)
    y = np.asarray(losses, dtype=float)[order]
    y = np.where(np.isfinite(y), y, np.inf)
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return Optimum(float(grid[i]), "low" if i == 0 else "high")
    xs, ys = x[i - 1 : i + 2], y[i - 1 : i + 2]
    if not np.all(np.isfinite(ys)):
        return Optimum(float(grid[i]), None)
    a, b, _ = np.polyfit(xs, ys, 2)
    if a <= 0:
        return Optimum(float(grid[i]), None)
    vertex = float(np.clip(-b / (2 * a), xs[0], xs[-1]))
    return Optimum(10**vertex, None)


def mean_curve(curves: np.ndarray) -> np.ndarray:
    """Mean over seeds (rows) per LR (columns); a diverged run (inf) makes its LR's mean inf."""
    return curves.mean(axis=0)


def arm_optimum(lrs: list[float], curves: np.ndarray) -> dict[str, Any]:
    """{"per_seed": [fitted LR per seed], "per_seed_edge": [each a bound?], "fitted": fitted LR of the
    seeds' mean curve, "edge": the fitted one a bound?, "edge_side": "low" / "high" / None}."""
    fit = fit_optimum(lrs, list(mean_curve(curves)))
    seeds = [fit_optimum(lrs, list(row)) for row in curves]
    return {
        "per_seed": [f.lr for f in seeds],
        "per_seed_edge": [f.edge is not None for f in seeds],
        "fitted": fit.lr,
        "edge": fit.edge is not None,
        "edge_side": fit.edge,
    }


def ratio_interval(
    base: tuple[list[float], np.ndarray], other: tuple[list[float], np.ndarray], seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of other's fitted optimum / base's over seeds (rows, resampled in
    pairs); each is (LRs, validation loss per seed and LR). None with one seed."""
    n = base[1].shape[0]
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(BOOTSTRAPS):
        idx = rng.integers(0, n, n)
        b = fit_optimum(base[0], list(mean_curve(base[1][idx]))).lr
        o = fit_optimum(other[0], list(mean_curve(other[1][idx]))).lr
        ratios.append(math.log10(o / b))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(10**lo), float(10**hi)


def lr_ratio(
    arms: tuple[str, str], base: tuple[list[float], np.ndarray], other: tuple[list[float], np.ndarray]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """results.json's `lr_ratio` (arms[1]'s best LR / arms[0]'s) and each arm's `lr_optimum`.

    base, other: (LRs, validation loss per seed (rows) and LR (columns, in the order of the LRs)), with
    the same seeds in the same order."""
    opt_b, opt_o = arm_optimum(*base), arm_optimum(*other)
    n = base[1].shape[0]
    interval = ratio_interval(base, other)
    edge = opt_b["edge"] or opt_o["edge"]
    notes = []
    if n < 2:
        notes.append("unreplicated: one seed, no interval")
    else:
        notes.append(f"95% interval: percentile bootstrap over {n} seeds, resampled in pairs")
        if n < 5:
            notes.append(f"with {n} seeds the bootstrap interval is rough (it can be too narrow)")
    for name, opt in zip(arms, (opt_b, opt_o), strict=True):
        if any(opt["per_seed_edge"]) and not opt["edge"]:
            notes.append(f"{name}: some seeds' best LR is on the grid's edge (per_seed_edge)")
        if opt["edge"]:
            side = "at or below" if opt["edge_side"] == "low" else "at or above"
            notes.append(
                f"{name}'s best LR is on the grid's {opt['edge_side']} edge: its optimum is {side} "
                f"{opt['fitted']:.2e}, a bound, so the ratio is a bound too"
            )
    record = {
        "arms": list(arms),
        "estimate": opt_o["fitted"] / opt_b["fitted"],
        "interval": list(interval) if interval is not None else None,
        "seeds": n,
        "per_seed": [o / b for b, o in zip(opt_b["per_seed"], opt_o["per_seed"], strict=True)],
        "edge": edge,
        "note": "; ".join(notes),
    }
    return record, _public(opt_b), _public(opt_o)


def _public(opt: dict[str, Any]) -> dict[str, Any]:
    return {k: opt[k] for k in ("per_seed", "per_seed_edge", "fitted", "edge")}
