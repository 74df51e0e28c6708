"""The paired-difference interval covers a known difference at least 93% of the time at 16 and 64
documents, on simulated per-document numbers shaped like a comparison's (bench/interval_coverage.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from interval_coverage import TRUE_DIFF, coverage, jackknife_t, simulate  # noqa: E402

from adaptlab.evaluate.stats import contrast_ci  # noqa: E402

SETS = 400  # a coverage of 0.95 reads within +-0.022 (2 standard errors)


@pytest.mark.parametrize("n_docs", [16, 64])
def test_interval_covers_a_known_difference_at_least_93_percent(n_docs: int) -> None:
    assert coverage(jackknife_t, n_docs, SETS)["coverage"] >= 0.93


def test_simulated_documents_are_skewed_and_unequal_in_length() -> None:
    a, b, tokens = simulate(np.random.default_rng(0), 4000)
    per_doc = (a - b) / tokens
    centered = per_doc - per_doc.mean()
    assert (centered**3).mean() / centered.std() ** 3 < -0.5  # a few documents gain far more
    assert tokens.max() / tokens.min() > 10
    assert (a - b).sum() / tokens.sum() == pytest.approx(TRUE_DIFF, abs=0.01)


def test_seed_spread_still_widens_the_document_interval_in_quadrature() -> None:
    a, b, tokens = simulate(np.random.default_rng(1), 16)
    one = contrast_ci([(1.0, a, tokens), (-1.0, b, tokens)])
    shifts = np.array([-0.02, 0.0, 0.02])[:, None]
    seeds = np.stack([a, a, a]) + shifts * tokens  # three seeds of arm a, differing by a shift each
    three = contrast_ci(
        [(1.0, seeds, np.tile(tokens, (3, 1))), (-1.0, np.stack([b] * 3), np.tile(tokens, (3, 1)))]
    )
    doc_half = (one["ci95"][1] - one["ci95"][0]) / 2
    seed_half = 4.3027 * 0.02 / np.sqrt(3)  # t with 2 degrees of freedom x the seeds' standard error
    assert (three["ci95"][1] - three["ci95"][0]) / 2 == pytest.approx(np.hypot(doc_half, seed_half), rel=1e-3)
