"""Verdicts and the pick use differences paired over the same documents, with a fallback for old results."""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptlab.report.paired import FALLBACK_NOTE, difference
from adaptlab.report.recommend import recommend

N_DOCS = 64


def _doc_numbers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(50, 400, size=N_DOCS).astype(float)
    difficulty = rng.gamma(3.0, 0.8, size=N_DOCS)  # documents differ far more than the arms do
    return tokens, difficulty


def arm(name: str, method: str, gain: float, forget: float, seed: int, **config: Any) -> dict[str, Any]:
    """An arm whose per-document NLL is the base's minus `gain` per token, with a little noise."""
    tokens, difficulty = _doc_numbers()
    rng = np.random.default_rng(seed)
    base = tokens * difficulty
    nll = tokens * (difficulty - gain + rng.normal(0, 0.02, N_DOCS))
    g_base = tokens * difficulty
    g_nll = tokens * (difficulty + forget + rng.normal(0, 0.02, N_DOCS))
    learning = float((base - nll).sum() / tokens.sum())
    forgetting = float((g_nll - g_base).sum() / tokens.sum())
    # a per-arm interval carries the documents' own difficulty: wide next to the arms' difference
    half = 0.1
    return {
        "name": name,
        "method": method,
        "status": "ok",
        "config": {
            "method": method,
            "targets": "all-linear",
            "batch": 4,
            "grad_accum": 1,
            "rank": 16,
            **config,
        },
        "learning": {"value": learning, "ci95": [learning - half, learning + half]},
        "forgetting": {"value": forgetting, "ci95": [forgetting - half, forgetting + half]},
        "cost": {"peak_mem_bytes": 1e9, "trainable_params": 1000},
        "analysis": None,
        "per_doc": {
            "target": {"tokens": tokens.tolist(), "base_nll": base.tolist(), "nll": [nll.tolist()]},
            "general": {"tokens": tokens.tolist(), "base_nll": g_base.tolist(), "nll": [g_nll.tolist()]},
        },
    }


def _results(*arms: dict[str, Any]) -> dict[str, Any]:
    return {"arms": list(arms), "forgetting_metric": "general_nll", "lr_rule": "rule"}


def _finding(rec: dict[str, Any], fid: str) -> dict[str, Any]:
    return next(f for f in rec["findings"] if f["id"] == fid)


def test_paired_differences_decide_what_overlapping_per_arm_intervals_cannot() -> None:
    full = arm("full", "full", gain=0.30, forget=0.10, seed=1)
    lora = arm("lora", "lora", gain=0.22, forget=0.05, seed=2)
    assert full["learning"]["ci95"][0] < lora["learning"]["ci95"][1]  # per-arm intervals overlap
    d = difference(full, lora, "learning", "general_nll")
    assert d is not None and d["paired"] and d["ci95"][0] > 0
    assert abs(d["value"] - (full["learning"]["value"] - lora["learning"]["value"])) < 1e-9
    rec = recommend(_results(full, lora))
    assert _finding(rec, "learns_less")["verdict"] == "agrees"
    assert _finding(rec, "forgets_less")["verdict"] == "agrees"
    assert rec["pick"] == "full" and "no other arm is shown to learn about as much" in rec["pick_reason"]
    (row,) = rec["vs_pick"]
    assert row["arm"] == "lora" and row["learning"]["ci95"][1] < 0 and row["forgetting"]["ci95"][1] < 0


def test_identical_arms_are_not_distinguishable_and_the_pick_is_the_one_that_forgets_less() -> None:
    a = arm("full", "full", gain=0.3, forget=0.10, seed=1)
    b = arm("lora", "lora", gain=0.3, forget=0.04, seed=1)
    b["per_doc"]["target"] = a["per_doc"]["target"]
    b["learning"] = dict(a["learning"])
    d = difference(a, b, "learning", "general_nll")
    assert d["value"] == 0 and d["ci95"][0] <= 0 <= d["ci95"][1]
    rec = recommend(_results(a, b))
    assert _finding(rec, "learns_less")["verdict"] == "cannot tell"
    assert rec["pick"] == "lora"  # shown to learn as much as full (the same numbers), and forgets less


def test_without_per_document_numbers_the_difference_falls_back_to_per_arm_intervals() -> None:
    full = arm("full", "full", gain=0.30, forget=0.10, seed=1)
    lora = arm("lora", "lora", gain=0.22, forget=0.05, seed=2)
    del full["per_doc"]
    d = difference(full, lora, "learning", "general_nll")
    assert d is not None and not d["paired"]
    assert d["ci95"] == [
        full["learning"]["ci95"][0] - lora["learning"]["ci95"][1],
        full["learning"]["ci95"][1] - lora["learning"]["ci95"][0],
    ]
    rec = recommend(_results(full, lora))
    assert _finding(rec, "learns_less")["verdict"] == "cannot tell"
    assert "unpaired" in " ".join(_finding(rec, "learns_less")["evidence"])
    assert "older adaptlab" in FALLBACK_NOTE
