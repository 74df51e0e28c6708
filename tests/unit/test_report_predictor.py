"""The KL-on-target-text predictor of forgetting: measured arms only, and "cannot tell" below 4."""

from __future__ import annotations

import numpy as np
from test_report_paired import arm

from adaptlab.report.predictor import MIN_ARMS, kl_predictor


def _with_kl(a: dict, kl: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tokens = np.asarray(a["per_doc"]["target"]["tokens"])
    per_doc = tokens * kl * rng.uniform(0.8, 1.2, len(tokens))
    a["per_doc"]["target_kl"] = {
        "kl": [per_doc.tolist()],
        "kl_reverse": [(1.5 * per_doc).tolist()],
        "tokens": [tokens.tolist()],
    }
    return a


def test_kl_that_orders_arms_like_their_forgetting_predicts_it() -> None:
    arms = [
        _with_kl(arm(f"a{i}", "lora", 0.2, forget, seed=i), 0.01 + forget, i)
        for i, forget in enumerate((0.02, 0.05, 0.1, 0.2, 0.4))
    ]
    failed = {"name": "broken", "status": "failed", "per_doc": arms[0]["per_doc"], "forgetting": {}}
    p = kl_predictor([*arms, failed], "general_nll", n_resamples=200)
    assert p["arms"] == [a["name"] for a in arms]  # the failed arm is not counted
    for key in ("base_tuned", "tuned_base"):
        assert p[key]["spearman"] > 0.99 and p[key]["ci95"][0] > 0.5
    assert "predicts the ranking" in p["verdict"]


def test_fewer_than_four_measured_arms_cannot_tell() -> None:
    arms = [_with_kl(arm(f"a{i}", "lora", 0.2, f, seed=i), f, i) for i, f in enumerate((0.02, 0.05, 0.1))]
    p = kl_predictor(arms, "general_nll")
    assert len(arms) < MIN_ARMS and "cannot tell" in p["verdict"] and "base_tuned" not in p


def test_arms_without_the_target_kl_say_it_was_not_measured() -> None:
    arms = [arm(f"a{i}", "lora", 0.2, f, seed=i) for i, f in enumerate((0.02, 0.05, 0.1, 0.2))]
    p = kl_predictor(arms, "general_nll")
    assert p["arms"] == [] and p["verdict"].startswith("not measured") and "base_tuned" not in p
