"""How often the paired-difference 95% interval covers a known difference, at 16 and 64 documents.

Each simulated data set is N held-out documents scored by two arms, shaped like a comparison's
per-document numbers: token counts from a log-normal cut at 512 (documents are cut to max_chars),
a per-document base difficulty (gamma), a per-document effect of the tuned arm that is skewed
(a few documents gain far more than most; "heavy skew" makes that stronger) and larger on harder
documents, and scoring noise that
shrinks with the document's length. The figure is the token-weighted difference, sum(NLL_a - NLL_b)
/ sum(tokens), as report/paired.py computes it; the effect is drawn independently of the token
count with mean TRUE_DIFF, so the token-weighted population difference is TRUE_DIFF.

Methods: the percentile bootstrap (1,000 paired resamples of documents), BCa (scipy.stats.bootstrap,
paired, vectorized) and the jackknife t interval that evaluate.stats.contrast_ci uses.

    python bench/interval_coverage.py                  # 400 data sets per size and scenario, ~30 s
    python bench/interval_coverage.py --sets 2000      # tighter coverage estimates
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from adaptlab.evaluate.stats import contrast_ci

RESULTS = Path(__file__).resolve().parent / "results" / "interval_coverage.json"
TRUE_DIFF = -0.05
"""The known difference, nats/token (the tuned arm lower: it learned)."""
SIZES = (16, 64)

Data = tuple[np.ndarray, np.ndarray, np.ndarray]  # (summed NLL of arm a, of arm b, tokens), each (N,)


SCENARIOS = {"typical": (4.0, 0.10), "heavy skew": (2.0, 0.12)}
"""(gamma shape of the per-document effect: skewness 2/sqrt(shape), its spread in nats/token)."""


def simulate(rng: np.random.Generator, n: int, scenario: str = "typical") -> Data:
    """One data set of n documents: per-document summed NLL of arms a and b, and token counts."""
    shape, spread = SCENARIOS[scenario]
    tokens = np.clip(rng.lognormal(np.log(250), 0.8, n), 16, 512).round()
    difficulty = rng.gamma(4.0, 0.6, n)  # base NLL per token, mean 2.4
    noise = lambda: rng.normal(0.0, 0.3, n) / np.sqrt(tokens / 50)  # noqa: E731
    skew = rng.gamma(shape, 1.0, n)
    effect = TRUE_DIFF - spread * (skew - shape) / np.sqrt(shape) * (difficulty / 2.4)
    b = tokens * (difficulty + noise())
    a = b + tokens * (effect + noise() / 3)
    return a, b, tokens


def _figure(a: np.ndarray, b: np.ndarray, t: np.ndarray, axis: int = -1) -> np.ndarray:
    return (a.sum(axis) - b.sum(axis)) / t.sum(axis)


def percentile(a: np.ndarray, b: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    idx = rng.integers(0, len(t), size=(1000, len(t)))
    lo, hi = np.percentile(_figure(a[idx], b[idx], t[idx]), [2.5, 97.5])
    return float(lo), float(hi)


def bca(a: np.ndarray, b: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    r = scipy_stats.bootstrap(
        (a, b, t), _figure, paired=True, vectorized=True, n_resamples=1000, method="BCa", rng=rng
    )
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


def jackknife_t(a: np.ndarray, b: np.ndarray, t: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    lo, hi = contrast_ci([(1.0, a, t), (-1.0, b, t)])["ci95"]
    return float(lo), float(hi)


METHODS: dict[
    str, Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator], tuple[float, float]]
] = {
    "percentile bootstrap": percentile,
    "BCa bootstrap": bca,
    "jackknife t (contrast_ci)": jackknife_t,
}


def coverage(
    method: Callable[..., tuple[float, float]], n: int, sets: int, scenario: str = "typical"
) -> dict[str, float]:
    """Share of `sets` simulated data sets whose interval contains TRUE_DIFF, and the median width."""
    covered, widths = 0, []
    for k in range(sets):
        data = simulate(np.random.default_rng(k), n, scenario)
        lo, hi = method(*data, np.random.default_rng(1_000_000 + k))
        covered += lo <= TRUE_DIFF <= hi
        widths.append(hi - lo)
    return {"coverage": covered / sets, "median_width": float(np.median(widths))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", type=int, default=400, help="Simulated data sets per size.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    print(f"{'scenario':11} {'method':28} {'docs':>5} {'coverage':>9} {'width':>8} {'s':>6}")
    for scenario in SCENARIOS:
        for name, method in METHODS.items():
            for n in SIZES:
                start = time.perf_counter()
                row = {"scenario": scenario, "method": name, "docs": n}
                row |= coverage(method, n, args.sets, scenario)
                row["seconds"] = round(time.perf_counter() - start, 2)
                rows.append(row)
                print(
                    f"{scenario:11} {name:28} {n:>5} {row['coverage']:>9.3f} {row['median_width']:>8.4f} "
                    f"{row['seconds']:>6.1f}"
                )
    se = np.sqrt(0.95 * 0.05 / args.sets)
    print(
        f"{args.sets} data sets per row: a coverage of 0.95 reads within +-{2 * se:.3f} (2 standard errors)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"sets": args.sets, "true_diff": TRUE_DIFF, "rows": rows}, indent=1) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
