"""Paired bootstrap differences: coverage of a known difference, identical arms, seeds, rank correlation."""

from __future__ import annotations

import numpy as np
import pytest

from adaptlab.evaluate.stats import contrast_ci, paired_difference, ratio_ci, spearman

TRUE_DIFF = 0.05


def _docs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-document token counts and per-document mean NLL of a shared base difficulty."""
    tokens = rng.integers(20, 400, size=n).astype(float)
    difficulty = rng.gamma(4.0, 0.6, size=n)  # documents differ far more than the arms do
    return tokens, difficulty


def _arm(rng: np.random.Generator, tokens: np.ndarray, difficulty: np.ndarray, shift: float) -> np.ndarray:
    noise = rng.normal(0.0, 0.3, size=len(tokens)) / np.sqrt(tokens / 50)
    return tokens * (difficulty + shift + noise)  # summed NLL per document


def test_paired_ci_covers_a_known_difference_in_at_least_93_of_100_trials() -> None:
    covered, widths, unpaired = 0, [], []
    for trial in range(100):
        rng = np.random.default_rng(1000 + trial)
        tokens, difficulty = _docs(rng, 64)
        a = _arm(rng, tokens, difficulty, TRUE_DIFF)
        b = _arm(rng, tokens, difficulty, 0.0)
        d = paired_difference((a, tokens), (b, tokens))
        lo, hi = d["ci95"]
        covered += lo <= TRUE_DIFF <= hi
        widths.append(hi - lo)
        if trial < 10:
            (a_lo, a_hi), (b_lo, b_hi) = ratio_ci(a, tokens), ratio_ci(b, tokens)
            unpaired.append(np.hypot(a_hi - a_lo, b_hi - b_lo))
    assert covered >= 93
    # pairing removes the documents' own difficulty: far narrower than the per-arm spread
    assert np.median(widths) < 0.5 * np.median(unpaired)


def test_two_identical_arms_give_an_interval_containing_zero() -> None:
    rng = np.random.default_rng(0)
    tokens, difficulty = _docs(rng, 32)
    a = _arm(rng, tokens, difficulty, 0.0)
    d = paired_difference((a, tokens), (a.copy(), tokens))
    assert d["value"] == 0.0 and d["ci95"][0] <= 0.0 <= d["ci95"][1]


def test_seeds_widen_the_interval_by_their_spread() -> None:
    rng = np.random.default_rng(3)
    tokens, difficulty = _docs(rng, 64)
    b = np.stack([_arm(rng, tokens, difficulty, 0.0) for _ in range(3)])
    calm = np.stack([_arm(rng, tokens, difficulty, TRUE_DIFF) for _ in range(3)])
    noisy = np.stack([_arm(rng, tokens, difficulty, TRUE_DIFF + s) for s in (-0.1, 0.0, 0.1)])
    t = np.tile(tokens, (3, 1))
    d_calm = paired_difference((calm, t), (b, t))
    d_noisy = paired_difference((noisy, t), (b, t))
    assert d_noisy["value"] == pytest.approx(d_calm["value"], abs=0.03)
    width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
    assert width(d_noisy) > 1.3 * width(d_calm)


def test_contrast_of_four_figures_cancels_the_shared_terms() -> None:
    rng = np.random.default_rng(5)
    tokens, difficulty = _docs(rng, 64)
    figs = [_arm(rng, tokens, difficulty, s) for s in (0.3, 0.1, 0.2, 0.1)]
    c = contrast_ci(
        [(1, figs[0], tokens), (-1, figs[1], tokens), (-1, figs[2], tokens), (1, figs[3], tokens)]
    )
    assert c["value"] == pytest.approx(0.1, abs=0.08)
    assert c["ci95"][0] <= 0.1 <= c["ci95"][1]


def test_a_contrast_needs_the_same_documents() -> None:
    with pytest.raises(ValueError, match="same documents"):
        paired_difference((np.ones(3), np.ones(3)), (np.ones(4), np.ones(4)))


def test_spearman_of_monotone_and_tied_data() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 35, 90])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1, 2, 3]), np.array([5, 5, 5])))


def test_two_seeds_add_their_spread_with_students_t() -> None:
    rng = np.random.default_rng(7)
    tokens, difficulty = _docs(rng, 64)
    t = np.tile(tokens, (2, 1))
    b = np.stack([tokens * difficulty, tokens * difficulty])
    a = np.stack([tokens * (difficulty + 0.010), tokens * (difficulty + 0.014)])  # per-seed differences
    d = paired_difference((a, t), (b, t))
    assert d["value"] == pytest.approx(0.012)
    half = 12.7062 * np.std([0.010, 0.014], ddof=1) / np.sqrt(2)  # t with 1 degree of freedom
    assert d["ci95"][0] == pytest.approx(0.012 - half, rel=1e-5)
    assert d["ci95"][1] == pytest.approx(0.012 + half, rel=1e-5)
