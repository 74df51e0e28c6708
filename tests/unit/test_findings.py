"""Every published claim is judged by one function (findings.verdict) over matched pairs of arms only:
for each claim, results where it holds, fails and cannot be decided; equivalence that is only "not
distinguishable"; pairs in regime- and continual-shaped studies; the report, reproduce, compare/rl.py
and plan saying the same thing of the same results."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from adaptlab import reproduce as rep
from adaptlab.compare.rl import rank1_vs_full, render
from adaptlab.findings import CLAIMS, REPORT_CLAIMS, decide, matched_pairs, verdict
from adaptlab.findings import claims as C
from adaptlab.findings.pairs import factors, is_full, is_lora_family
from adaptlab.plan.advice import _measured_sentence
from adaptlab.report.recommend import recommend


def arm(
    name: str,
    method: str,
    learning: float,
    forgetting: float = 0.1,
    half: float = 0.01,
    own: float | None = None,
    seeds: int = 1,
    **config: Any,
) -> dict[str, Any]:
    """An arm of results.json with per-arm intervals (no per-document numbers: the unpaired rule)."""
    cfg = {
        "method": method,
        "rank": None if method == "full" else 16,
        "targets": "all-linear",
        "batch": 4,
        "grad_accum": 1,
        "seq_len": 128,
        "tokens": 8192,
        "lr_source": "rule",
        "data": None,
        "data_fraction": None,
        "init_from": None,
        **config,
    }
    if method == "full":
        cfg.pop("targets")
    out = {
        "name": name,
        "method": method,
        "status": "ok",
        "config": cfg,
        "runs": [{"run": f"{name}-s{s}", "seed": s} for s in range(seeds)],
        "learning": {"value": learning, "ci95": [learning - half, learning + half], "docs": 16},
        "forgetting": {"value": forgetting, "ci95": [forgetting - half, forgetting + half]},
        "cost": {"peak_mem_bytes": 1e9, "trainable_params": 1000},
        "analysis": None,
    }
    if own is not None:
        out["own_learning"] = {"value": own, "ci95": [own - half, own + half]}
    return out


def results(*arms: dict[str, Any]) -> dict[str, Any]:
    return {"arms": list(arms), "forgetting_metric": "general_nll", "lr_rule": "rule"}


def _swept(name: str, method: str, best: float) -> dict[str, Any]:
    a = arm(name, method, 0.4, lr_source="sweep")
    grid = [best / 9, best / 3, best, best * 3, best * 9]
    a["lr_sweep"] = {"best_lr": best, "best_at_edge": False, "points": [{"lr": x} for x in grid]}
    return a


def _analysed(name: str, method: str, per_layer: float) -> dict[str, Any]:
    a = arm(name, method, 0.4)
    a["analysis"] = {"layers": 2, "intruders": int(2 * per_layer), "intruders_per_layer": per_layer}
    return a


HOLDS, FAILS, UNCLEAR = 0, 1, 2
CASES: dict[str, Any] = {
    # claim id: effect -> results (effect: HOLDS, FAILS, UNCLEAR)
    "learns_less": lambda e: results(arm("full", "full", 0.5), arm("lora", "lora", (0.3, 0.7, 0.5)[e])),
    "forgets_less": lambda e: results(
        arm("full", "full", 0.5, 0.2), arm("lora", "lora", 0.4, (0.05, 0.4, 0.2)[e])
    ),
    "lr_ratio": lambda e: results(
        _swept("full", "full", 1e-5), _swept("lora", "lora", 1e-5 * (10, 0.5, 3)[e])
    ),
    "targets": lambda e: results(
        arm("lora-all", "lora", 0.5),
        arm("lora-attn", "lora", (0.3, 0.7, 0.5)[e], targets="attention", rank=40),
    ),
    "batch": lambda e: results(
        arm("full-small", "full", 0.50, batch=1),
        arm("full-large", "full", 0.49, grad_accum=4),
        arm("lora-small", "lora", 0.50, batch=1),
        arm("lora-large", "lora", (0.20, 0.80, 0.49)[e], grad_accum=4),
    ),
    "data_size": lambda e: results(
        arm("full-1", "full", 0.1, data_fraction=0.01, tokens=512),
        arm("lora-1", "lora", 0.2, data_fraction=0.01, tokens=512),
        arm("full-100", "full", 0.6, data_fraction=1.0),
        arm("lora-100", "lora", (0.3, 0.9, 0.7)[e], data_fraction=1.0),
    ),
    "rank": lambda e: results(
        arm("lora-r1", "lora", (0.3, 0.5, 0.4)[e], rank=1),
        arm("lora-r4", "lora", 0.45, rank=4),
        arm("lora-r16", "lora", (0.5, 0.3, 0.4)[e], rank=16),
    ),
    "intruders": lambda e: results(
        _analysed("full", "full", (0.0, 1.0, 0.0)[e]), _analysed("lora", "lora", (2.0, 0.0, 0.0)[e])
    ),
    "qlora": lambda e: results(
        arm("lora", "lora", 0.5),
        arm("qlora", "qlora", (0.5, 0.3, 0.5)[e], half=(0.01, 0.01, 0.05)[e]),
    ),
    "regime": lambda e: results(*_regime(cpt_gap=(0.3, -0.3, 0.0)[e])),
    "continual": lambda e: results(*_continual(lora_after=(0.35, -0.2, 0.0)[e])),
    "rank1_rl": lambda e: {
        "base": {"pass1": 0.2, "n": 60},
        "rank1_vs_full": {
            "delta_pass1": (0.01, -0.14, -0.05)[e],
            "ci95": ([-0.03, 0.05], [-0.2, -0.08], [-0.15, 0.05])[e],
        },
    },
}
CASES["forgets_less_healed"] = CASES["forgets_less"]


def _regime(cpt_gap: float) -> list[dict[str, Any]]:
    """The regime study's arms: CPT on the comparison's data, IFT on pairs (own_learning), two budgets."""
    out = []
    for budget, tokens in (("small", 2048), ("large", 8192)):
        gap = cpt_gap if budget == "large" else 0.1
        out += [
            arm(f"cpt-full-{budget}", "full", 0.4 + gap, tokens=tokens),
            arm(f"cpt-lora-{budget}", "lora", 0.4, tokens=tokens),
            arm(f"ift-full-{budget}", "full", 0.1, own=0.3, tokens=tokens, data=["pairs.jsonl"]),
            arm(f"ift-lora-{budget}", "lora", 0.05, own=0.3, tokens=tokens, data=["pairs.jsonl"]),
        ]
    return out


def _continual(lora_after: float) -> list[dict[str, Any]]:
    """full and LoRA on A, each continued on B; a separate B adapter. Learning is measured on A."""
    return [
        arm("full-a", "full", 0.5),
        arm("lora-a", "lora", 0.4),
        arm("full-a-then-b", "full", 0.1, data=["b.jsonl"], init_from="full-a"),
        arm("lora-a-then-b", "lora", lora_after, data=["b.jsonl"], init_from="lora-a"),
        arm("lora-b", "lora", 0.0, data=["b.jsonl"]),
    ]


def test_every_claim_has_its_three_cases() -> None:
    assert set(CASES) == {c.id for c in CLAIMS}
    assert len({c.id for c in CLAIMS}) == len(CLAIMS)


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: c.id)
def test_each_claim_agrees_disagrees_or_cannot_tell(claim: C.Claim) -> None:
    for effect, expected in ((HOLDS, "agrees"), (FAILS, "disagrees"), (UNCLEAR, "cannot tell")):
        v = verdict(claim, CASES[claim.id](effect))
        assert v.verdict == expected, (claim.id, effect, v)
        assert v.ci95 is not None and v.ci95[0] <= v.estimate <= v.ci95[1]
        assert v.pairs and v.n_seeds == 1 and v.unreplicated
        assert v.text == f"{expected} (unreplicated: one seed)"
    assert verdict(claim, {"arms": []}).verdict == "not run"


def test_the_tests_read_the_interval_as_stated() -> None:
    assert decide("superiority", (0.01, 0.2)) == "agrees"
    assert decide("superiority", (-0.2, -0.01)) == "disagrees"
    assert decide("superiority", (-0.01, 0.2)) == "cannot tell"
    assert decide("non-inferiority", (-0.04, 0.2), 0.05) == "agrees"
    assert decide("non-inferiority", (-0.3, -0.06), 0.05) == "disagrees"
    assert decide("non-inferiority", (-0.3, 0.2), 0.05) == "cannot tell"
    assert decide("equivalence", (-0.04, 0.04), 0.05) == "agrees"
    assert decide("equivalence", (0.06, 0.2), 0.05) == "disagrees"
    assert decide("equivalence", (float("nan"), 0.0), 0.05) == "cannot tell"


def test_an_interval_around_zero_wider_than_the_margin_is_never_the_same() -> None:
    """QLoRA - LoRA = 0 [-0.06, +0.06] with a margin of 0.05 (10% of LoRA's 0.5): not distinguishable,
    and not shown equivalent either."""
    r = results(arm("lora", "lora", 0.5), arm("qlora", "qlora", 0.5, half=0.05))
    v = verdict(C.QLORA, r)
    assert v.estimate == pytest.approx(0.0) and v.ci95[0] < 0 < v.ci95[1]
    assert v.margin == pytest.approx(0.05) and v.ci95[1] - v.ci95[0] > 2 * v.margin
    assert v.verdict == "cannot tell"
    assert decide("equivalence", (-0.06, 0.06), 0.05) == "cannot tell"


def test_qlora_is_judged_on_what_it_reaches_not_on_repairing_its_own_4bit_base() -> None:
    """The 4-bit base alone loses 0.3 nats/token; QLoRA's adapter wins that back and 0.2 more, so it ends
    at 0.2 against the full-precision base, where LoRA reaches 0.5: QLoRA learned less."""
    qlora = arm("qlora", "qlora", 0.2)
    qlora["quantized_base"] = {"learning": {"value": -0.3, "ci95": [-0.31, -0.29]}}
    v = verdict(C.QLORA, results(arm("lora", "lora", 0.5), qlora))
    assert v.estimate == pytest.approx(-0.3) and v.verdict == "disagrees"


def test_rank_1_in_rl_is_non_inferiority_and_compare_rl_says_so() -> None:
    """Rank 1 within 5 points of full agrees (the old rule asked rank 1 to beat full); compare/rl.py's
    "matched" and its report come from the same verdict."""
    full = np.array([1.0, 0.0] * 50)
    same = rank1_vs_full(
        {"lora-r1": [SimpleNamespace(pass1=full.copy())], "full": [SimpleNamespace(pass1=full)]}
    )
    assert same["verdict"] == "agrees" and same["matched"] and same["margin"] == C.RL_PASS1_MARGIN
    worse = full.copy()
    worse[::2] = 0.0  # rank 1 solves none of the prompts full solves
    r = rank1_vs_full({"lora-r1": [SimpleNamespace(pass1=worse)], "full": [SimpleNamespace(pass1=full)]})
    assert r["verdict"] == "disagrees" and not r["matched"]
    straddle = {"delta_pass1": -0.05, "ci95": [-0.15, 0.05]}
    v = verdict(C.RANK1_RL, {"rank1_vs_full": straddle, "base": {"n": 60}})
    assert v.verdict == "cannot tell" and v.n_docs == 60  # reaches 0, yet cannot tell: not "matched"
    study = {"study": "rl", "model": "m", "task": "t", "steps": 1, "prompts_per_step": 1, "group_size": 1}
    text = render({"study": study, "base": {"n": 60, "pass1": 0.2}, "arms": [], "rank1_vs_full": straddle})
    assert "cannot tell (unreplicated: one seed)" in text and "matched full" not in text


def _check_pair(x: dict[str, Any], y: dict[str, Any], by: dict[str, dict[str, Any]]) -> None:
    """Two arms paired on their method: same data, budget, batch, LR policy, seeds and starting point."""
    fx, fy = factors(x, by), factors(y, by)
    for f in ("data", "tokens", "init_from", "batch", "precision", "lr_policy", "seeds", "targets"):
        assert fx[f] == fy[f], (x["name"], y["name"], f)
    cx, cy = x["config"], y["config"]
    assert (cx["data"], cx["tokens"]) == (cy["data"], cy["tokens"])
    if cx["init_from"] or cy["init_from"]:  # each continues its own method's run on the same data
        start_x, start_y = by[cx["init_from"]], by[cy["init_from"]]
        assert start_x["method"] == x["method"] and start_y["method"] == y["method"]
        assert start_x["config"]["data"] == start_y["config"]["data"]


@pytest.mark.parametrize("study", ["regime", "continual"])
def test_no_pair_differs_in_data_budget_or_starting_point(study: str) -> None:
    arms = _regime(0.3) if study == "regime" else _continual(0.35)
    by = {a["name"]: a for a in arms}
    r = results(*arms)
    used = 0
    for claim in REPORT_CLAIMS:
        for names in verdict(claim, r).pairs:
            for x, y in zip(names[::2], names[1::2], strict=True):  # a pair, or an interaction's two pairs
                _check_pair(by[x], by[y], by)
                used += 1
    assert used >= 3
    for x, y in matched_pairs(arms, "method", is_full, is_lora_family):
        _check_pair(x, y, by)
    pairs = {p for c in (C.LEARNS_LESS, C.FORGETS_LESS) for p in verdict(c, r).pairs}
    if study == "regime":  # never cpt-full-large with ift-lora-small, or any other crossing
        assert {("cpt-full-small", "cpt-lora-small"), ("cpt-full-large", "cpt-lora-large")} <= pairs
        assert ("cpt-full-large", "ift-lora-small") not in pairs
        assert verdict(C.REGIME, r).pairs == (
            ("cpt-full-large", "cpt-lora-large", "ift-full-small", "ift-lora-small"),
        )
    else:  # full-a with lora-a only: lora-b trained on B, the A-then-B arms start from A
        assert pairs == {("full-a", "lora-a")}
        assert verdict(C.CONTINUAL, r).pairs == (("full-a", "lora-a", "full-a-then-b", "lora-a-then-b"),)


def test_arms_that_differ_in_more_than_the_method_are_never_paired() -> None:
    assert C.LEARNS_LESS.contrast.matched_on == (
        "targets",
        "precision",
        "data",
        "tokens",
        "init_from",
        "batch",
        "lr_policy",
        "seeds",
    )
    base = dict(name="lora", method="lora", learning=0.3)
    for other in ({"tokens": 4096}, {"data": ["x.jsonl"]}, {"batch": 8}, {"lr_source": "explicit"}):
        r = results(arm("full", "full", 0.5), arm(**base, **other))
        assert verdict(C.LEARNS_LESS, r).verdict == "not run", other
    r = results(arm("full", "full", 0.5), arm("lora", "lora", 0.3, seeds=2))
    assert verdict(C.LEARNS_LESS, r).verdict == "not run"  # other seed sets: not paired seed by seed


def _methods_results() -> dict[str, Any]:
    return results(
        arm("full", "full", 0.50, 0.20),
        arm("lora", "lora", 0.30, 0.05),
        arm("lora-attn", "lora", 0.35, 0.05, targets="attention", rank=40),
        arm("rslora", "lora+rslora", 0.45, 0.15),
        arm("dora", "dora", 0.49, 0.19, half=0.05),
        arm("qlora", "qlora", 0.28, 0.06),
    )


def test_report_reproduce_and_plan_give_the_same_verdict_on_the_same_results(tmp_path: Path) -> None:
    r = _methods_results()
    r["recommendation"] = rec = recommend(r)
    r["model"] = "tiny-random"
    comparison = rep.Comparison("legal/methods", "methods", "legal", {})
    judged = {f["id"]: f for f in rep.judge([comparison], {comparison.key: r})}
    reported = {f["id"]: f for f in rec["findings"]}
    shared = {fid for fid in set(judged) & set(reported) if judged[fid]["rows"]}
    assert {"learns_less", "forgets_less", "targets", "intruders", "qlora"} <= shared
    for fid in shared:
        (row,) = judged[fid]["rows"]
        for key in ("verdict", "verdict_text", "value", "ci95", "pairs", "n_seeds"):
            assert row[key] == reported[fid][key], (fid, key)
    assert reported["learns_less"]["pairs"] == [["full", "lora"], ["full", "rslora"], ["full", "dora"]]
    md = rep.write_findings({"findings": list(judged.values())}, tmp_path / "findings.md").read_text()
    assert f"| {judged['learns_less']['rows'][0]['verdict_text']} |" in md
    sentence = _measured_sentence(tmp_path / "cmp" / "results.json", r)
    assert f"LoRA learns less: {reported['learns_less']['verdict_text']}" in sentence
    assert f"LoRA forgets less: {reported['forgets_less']['verdict_text']}" in sentence


def test_one_document_and_one_seed_cannot_tell() -> None:
    """A contrast over one held-out document and one seed has a zero-width interval: no verdict."""
    full, lora = arm("full", "full", 0.5, half=0.0), arm("lora", "lora", 0.3, half=0.0)
    for a in (full, lora):
        a["learning"]["docs"] = 1
    v = verdict(C.LEARNS_LESS, results(full, lora))
    assert v.ci95 == pytest.approx((0.2, 0.2)) and v.verdict == "cannot tell"


def test_seeds_replicate_and_lift_the_unreplicated_flag() -> None:
    r = results(arm("full", "full", 0.5, seeds=3), arm("lora", "lora", 0.3, seeds=3))
    v = verdict(C.LEARNS_LESS, r)
    assert v.n_seeds == 3 and not v.unreplicated and v.text == "agrees"


def test_the_lr_claim_reads_the_fitted_ratio_and_its_interval_over_seeds() -> None:
    """The LR study's fitted optima decide the claim: inside 10x's margin agrees, far outside disagrees,
    one seed (no interval) or an optimum on the grid's edge (a bound) cannot tell."""

    def ratio(estimate: float, interval: list[float] | None, seeds: int = 3, edge: bool = False) -> Any:
        fitted = {"arms": ["full", "lora"], "estimate": estimate, "interval": interval, "seeds": seeds}
        return verdict(C.LR_RATIO, {"arms": [], "lr_ratio": {**fitted, "edge": edge, "note": ""}})

    assert ratio(9.0, [6.0, 14.0]).verdict == "agrees"
    assert ratio(1.2, [0.8, 1.9]).verdict == "disagrees"  # the same LR for both: not 10x
    assert ratio(9.0, [1.5, 60.0]).verdict == "cannot tell"
    one = ratio(9.0, None, seeds=1)
    assert one.verdict == "cannot tell" and one.text == "cannot tell (unreplicated: one seed)"
    assert ratio(9.0, [6.0, 14.0], edge=True).verdict == "cannot tell"
