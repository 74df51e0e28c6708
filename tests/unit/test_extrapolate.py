"""Budget extrapolation: power-law fits over documents, paired differences, the held-out budget check."""

from __future__ import annotations

import numpy as np
import pytest
from test_report_paired import arm

from adaptlab.report.extrapolate import extrapolate, fit_power_law


def _family(method: str, gains: dict[int, float], seed: int) -> list[dict]:
    out = []
    for i, (tokens, gain) in enumerate(gains.items()):
        a = arm(f"{method}-{tokens}", method, gain=gain, forget=0.02 * (tokens / 1000) ** 0.5, seed=seed + i)
        a["cost"]["tokens_seen"] = tokens
        out.append(a)
    return out


def test_fit_power_law_recovers_its_parameters_and_refuses_non_positive_values() -> None:
    t = np.array([1000.0, 2000.0, 4000.0])
    a, b = fit_power_law(t, 0.01 * t**0.4)
    assert a == pytest.approx(0.01) and b == pytest.approx(0.4)
    assert fit_power_law(t, np.array([0.1, -0.01, 0.2])) is None


def test_power_law_data_extrapolate_within_their_interval_and_differences_are_paired() -> None:
    law = lambda t, c: c * (t / 1000) ** 0.5  # noqa: E731
    arms = _family("full", {t: law(t, 0.3) for t in (1000, 2000, 4000)}, 0)
    arms += _family("lora", {t: law(t, 0.2) for t in (1000, 2000, 4000)}, 10)
    ex = extrapolate([a for a in arms if a["cost"]["tokens_seen"] < 4000], "general_nll", target_tokens=4000)
    for fam, c in zip(ex["families"], (0.3, 0.2), strict=True):
        lo, hi = fam["learning"]["ci95"]
        assert lo <= law(4000, c) <= hi
    (d,) = ex["differences"]
    assert d["family"] == "lora" and d["reference"] == "full"
    assert d["learning"]["ci95"][1] < 0  # lora learns less, distinguishably
    assert not ex["far"]
    far = extrapolate(arms, "general_nll", target_tokens=10**6)
    assert far["far"] and any("beyond the largest budget" in line for line in far["summary"])


def test_a_curve_that_is_no_power_law_fails_the_held_out_budget_check() -> None:
    arms = _family("lora", {1000: 0.027, 2000: 0.029, 4000: 0.100}, 0)  # learning that takes off late
    ex = extrapolate(arms, "general_nll")
    h = ex["families"][0]["learning"]["holdout"]
    assert h["tokens"] == 4000 and not h["within"]
    assert any("does not hold here" in line for line in ex["summary"])
