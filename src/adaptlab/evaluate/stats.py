"""Bootstrap 95% confidence intervals over documents or items, with a fixed seed.

Figures here are ratios of sums (NLL per token = sum of NLL / sum of tokens; accuracy = sum of
correct / items), so each resample draws documents with replacement and recomputes the ratio.
A difference between a tuned model and its base is paired: one resample draws the same
documents for both, which is what makes small differences on the same text detectable.

    python -c "import numpy as np; from adaptlab.evaluate.stats import ratio_ci; \\
print(ratio_ci(np.random.rand(100), np.ones(100)))"
"""

from __future__ import annotations

import numpy as np

N_RESAMPLES = 1000
SEED = 0
_CHUNK = 1 << 22  # index entries per chunk of resamples, bounds memory for large N


def _resample_sums(columns: list[np.ndarray], n_resamples: int, seed: int) -> list[np.ndarray]:
    """For each column, its sum over each of n_resamples bootstrap draws of the rows (same draws for all)."""
    n = len(columns[0])
    rng = np.random.default_rng(seed)
    out = [np.empty(n_resamples, dtype=np.float64) for _ in columns]
    per_chunk = max(1, _CHUNK // max(n, 1))
    for lo in range(0, n_resamples, per_chunk):
        hi = min(lo + per_chunk, n_resamples)
        idx = rng.integers(0, n, size=(hi - lo, n))
        for col, dst in zip(columns, out, strict=True):
            dst[lo:hi] = col[idx].sum(axis=1)
    return out


def _interval(samples: np.ndarray) -> list[float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def ratio_ci(
    num: np.ndarray, den: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) over documents resampled with replacement."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if len(num) < 2:
        value = float(num.sum() / den.sum()) if den.sum() else float("nan")
        return [value, value]
    s_num, s_den = _resample_sums([num, den], n_resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(s_num / s_den)


def paired_delta_ci(
    num_tuned: np.ndarray,
    den_tuned: np.ndarray,
    num_base: np.ndarray,
    den_base: np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> list[float]:
    """95% interval of sum(num_t)/sum(den_t) - sum(num_b)/sum(den_b), the same documents drawn for both."""
    cols = [np.asarray(c, dtype=np.float64) for c in (num_tuned, den_tuned, num_base, den_base)]
    if len({len(c) for c in cols}) != 1:
        raise ValueError("tuned and base figures must cover the same documents")
    if len(cols[0]) < 2:
        value = cols[0].sum() / cols[1].sum() - cols[2].sum() / cols[3].sum()
        return [float(value), float(value)]
    nt, dt, nb, db = _resample_sums(cols, n_resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _interval(nt / dt - nb / db)
