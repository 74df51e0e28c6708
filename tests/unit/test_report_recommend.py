"""The recommendation is computed from the numbers: Pareto frontier, CI overlap, findings' verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from adaptlab.report.recommend import pareto_frontier, recommend, relation


def arm(
    name: str,
    method: str,
    learning: float,
    forgetting: float,
    half: float = 0.01,
    mem: float = 1e9,
    targets: str = "all-linear",
    **config: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "method": method,
        "status": "ok",
        "config": {"method": method, "targets": targets, "batch": 4, "grad_accum": 1, "rank": 16, **config},
        "learning": {"value": learning, "ci95": [learning - half, learning + half]},
        "forgetting": {"value": forgetting, "ci95": [forgetting - half, forgetting + half]},
        "cost": {"peak_mem_bytes": mem, "trainable_params": 1000},
        "analysis": None,
    }


def results(*arms: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"arms": list(arms), "forgetting_metric": "drift_kl", "lr_rule": "rule", **extra}


def finding(rec: dict[str, Any], fid: str) -> dict[str, Any]:
    return next(f for f in rec["findings"] if f["id"] == fid)


def test_pareto_frontier_keeps_only_undominated_points_in_order_of_forgetting() -> None:
    pts = [("a", 1.0, 0.5), ("b", 0.8, 0.1), ("c", 0.7, 0.3), ("d", 1.0, 0.6), ("e", 0.2, 0.0)]
    # c is dominated by b (learns more, forgets less); d by a (same learning, forgets more)
    assert pareto_frontier(pts) == ["e", "b", "a"]


def test_pareto_frontier_ties_are_both_kept() -> None:
    assert sorted(pareto_frontier([("a", 1.0, 0.5), ("b", 1.0, 0.5)])) == ["a", "b"]


def test_relation_of_intervals() -> None:
    assert relation([0.3, 0.4], [0.1, 0.2]) == "above"
    assert relation([0.1, 0.2], [0.3, 0.4]) == "below"
    assert relation([0.1, 0.35], [0.3, 0.4]) == "overlap"


def test_separated_cis_full_learns_more_and_forgets_more_agrees_with_biderman() -> None:
    rec = recommend(results(arm("full", "full", 0.50, 0.20), arm("lora", "lora", 0.30, 0.05)))
    assert rec["frontier"] == ["lora", "full"]
    assert rec["pick"] == "full"  # learns distinguishably more
    assert finding(rec, "learns_less")["verdict"] == "agrees"
    assert finding(rec, "forgets_less")["verdict"] == "agrees"


def test_summary_names_the_pick_under_each_forgetting_and_memory_limit() -> None:
    rec = recommend(
        results(arm("full", "full", 0.50, 0.20, mem=4e9), arm("lora", "lora", 0.30, 0.05, mem=1e9))
    )
    lines = rec["summary"].splitlines()
    assert "Under a forgetting limit: drift KL <= 0.0500: lora; drift KL <= 0.2000: full." in lines
    assert "Under a memory limit: >= 1.00 GB: lora; >= 4.00 GB: full." in lines


def test_overlapping_learning_cis_are_not_a_tie_and_the_verdict_cannot_tell() -> None:
    """An interval of full - lora from -0.09 to +0.11 does not show lora learning about as much as full
    (10% of 0.31 is 0.031): not distinguishable is not "the same", so the best learner stays the pick."""
    rec = recommend(
        results(arm("full", "full", 0.31, 0.20, half=0.05), arm("lora", "lora", 0.30, 0.05, half=0.05))
    )
    assert rec["pick"] == "full"
    assert "no other arm is shown to learn about as much" in rec["pick_reason"]
    assert finding(rec, "learns_less")["verdict"] == "cannot tell"
    assert finding(rec, "forgets_less")["verdict"] == "agrees"
    assert finding(rec, "forgets_less")["verdict_text"] == "agrees (unreplicated: one seed)"


def test_measurements_against_the_paper_give_disagrees() -> None:
    rec = recommend(results(arm("full", "full", 0.2, 0.01), arm("lora", "lora", 0.5, 0.30)))
    assert finding(rec, "learns_less")["verdict"] == "disagrees"
    assert finding(rec, "forgets_less")["verdict"] == "disagrees"
    assert rec["frontier"] == ["full", "lora"]


def test_targets_finding_at_matched_params() -> None:
    rec = recommend(
        results(arm("lora", "lora", 0.5, 0.1), arm("lora-attn", "lora", 0.3, 0.1, targets="attention"))
    )
    assert finding(rec, "targets")["verdict"] == "agrees"
    rec = recommend(
        results(arm("lora", "lora", 0.30, 0.1), arm("lora-attn", "lora", 0.31, 0.1, targets="attention"))
    )
    assert finding(rec, "targets")["verdict"] == "cannot tell"


def test_findings_without_the_arms_that_test_them_are_not_run() -> None:
    rec = recommend(results(arm("full", "full", 0.5, 0.2), arm("lora", "lora", 0.3, 0.05)))
    for fid in ("lr_ratio", "targets", "batch", "data_size", "rank", "intruders", "qlora", "regime"):
        assert finding(rec, fid)["verdict"] == "not run"


def test_lr_ratio_measured_from_sweeps() -> None:
    def sweep(best: float, grid: list[float]) -> dict[str, Any]:
        return {"best_lr": best, "best_at_edge": best in (min(grid), max(grid)), "points": []}

    full = arm("full", "full", 0.5, 0.2, lr_sweep=None)
    full["lr_sweep"] = sweep(2e-5, [1e-5, 2e-5, 6e-5])
    lora = arm("lora", "lora", 0.4, 0.1)
    lora["lr_sweep"] = sweep(2e-4, [6e-5, 2e-4, 6e-4])
    assert finding(recommend(results(full, lora)), "lr_ratio")["verdict"] == "agrees"
    lora["lr_sweep"] = sweep(2e-5, [2e-5, 6e-5, 2e-4])
    assert (
        finding(recommend(results(full, lora)), "lr_ratio")["verdict"] == "cannot tell"
    )  # at the grid's edge: the optimum may lie anywhere below it


def test_batch_sensitivity_compares_drops_with_their_uncertainty() -> None:
    arms = [
        arm("full-small", "full", 0.50, 0.1, batch=1),
        arm("full-large", "full", 0.49, 0.1, grad_accum=4),
        arm("lora-small", "lora", 0.50, 0.1, batch=1),
        arm("lora-large", "lora", 0.20, 0.1, grad_accum=4),
    ]
    assert finding(recommend(results(*arms)), "batch")["verdict"] == "agrees"
    arms[3] = arm("lora-large", "lora", 0.48, 0.1, grad_accum=4)
    assert finding(recommend(results(*arms)), "batch")["verdict"] == "cannot tell"


def test_data_size_crossover() -> None:
    arms = [
        arm("full-1", "full", 0.10, 0.1, data_fraction=0.01),
        arm("lora-1", "lora", 0.20, 0.1, data_fraction=0.01),
        arm("full-100", "full", 0.60, 0.1, data_fraction=1.0),
        arm("lora-100", "lora", 0.30, 0.1, data_fraction=1.0),
    ]
    f = finding(recommend(results(*arms)), "data_size")
    assert f["verdict"] == "agrees"
    assert f["pairs"] == [["full-100", "lora-100", "full-1", "lora-1"]]
    assert (
        "gap full-100 - lora-100 = +0.3000" in f["evidence"][0]
        and "gap full-1 - lora-1 = -0.1000" in f["evidence"][0]
    )


def test_limits_pick_the_best_learning_arm_that_fits() -> None:
    arms = [arm("full", "full", 0.5, 0.2, mem=5e9), arm("lora", "lora", 0.3, 0.05, mem=2e9)]
    rec = recommend(results(*arms, limits={"forgetting": 0.1, "memory_gb": 3.0}))
    assert rec["under_forgetting_limit"]["pick"] == "lora"
    assert rec["under_memory_limit"]["pick"] == "lora"
    rec = recommend(results(*arms, limits={"forgetting": 0.01, "memory_gb": 1.0}))
    assert rec["under_forgetting_limit"]["pick"] is None
    assert rec["under_memory_limit"]["pick"] is None
    assert [s["pick"] for s in rec["memory_ladder"]] == ["lora", "full"]


def test_failed_arms_are_left_out() -> None:
    bad = {"name": "dora", "method": "dora", "status": "failed", "error": "boom", "config": {}}
    rec = recommend(results(arm("lora", "lora", 0.3, 0.05), bad))
    assert rec["pick"] == "lora" and rec["frontier"] == ["lora"]
    assert recommend(results(bad))["pick"] is None


def test_relation_at_touching_and_barely_separated_intervals() -> None:
    assert relation([0.3, 0.4], [0.1, 0.3]) == "overlap"  # a shared endpoint is not a separation
    assert relation([0.30001, 0.4], [0.1, 0.3]) == "above"
    assert relation([0.1, 0.3], [0.3, 0.5]) == "overlap"
    assert relation([0.1, 0.29999], [0.3, 0.5]) == "below"


def test_verdicts_follow_the_intervals_not_the_point_estimates() -> None:
    """The same point estimates give agrees or cannot tell depending only on the interval widths; a wide
    interval does not make lora a learning tie of full, so full stays the pick."""
    narrow = recommend(
        results(arm("full", "full", 0.50, 0.20, half=0.04), arm("lora", "lora", 0.40, 0.10, half=0.04))
    )
    wide = recommend(
        results(arm("full", "full", 0.50, 0.20, half=0.06), arm("lora", "lora", 0.40, 0.10, half=0.06))
    )
    for fid in ("learns_less", "forgets_less"):
        assert finding(narrow, fid)["verdict"] == "agrees"
        assert finding(wide, fid)["verdict"] == "cannot tell"
    assert narrow["pick"] == "full" and wide["pick"] == "full"


def test_lora_family_arms_pool_into_one_verdict_over_their_matched_pairs() -> None:
    """full - mean(lora, dora): one estimate over both matched pairs, each pair in the evidence; an
    attention-only arm (other targets) is never paired with full."""
    arms = [
        arm("full", "full", 0.50, 0.20),
        arm("lora", "lora", 0.30, 0.05),
        arm("dora", "dora", 0.49, 0.19),
        arm("lora-attn", "lora", 0.10, 0.01, targets="attention"),
    ]
    f = finding(recommend(results(*arms)), "learns_less")
    assert f["pairs"] == [["full", "lora"], ["full", "dora"]]
    assert f["value"] == pytest.approx(0.50 - (0.30 + 0.49) / 2)
    assert f["verdict"] == "agrees" and len(f["evidence"]) >= 3
    arms[2] = arm("dora", "dora", 0.70, 0.30)  # learns more than full: the pooled gap straddles 0
    assert finding(recommend(results(*arms)), "learns_less")["verdict"] == "cannot tell"


def test_lr_ratio_far_from_ten_disagrees() -> None:
    """The ratio's interval is half a grid step either side of each best LR (grids of 3x steps here);
    "about 10x" is LR_RATIO_TOLERANCE either way, defined once in the claim."""
    from adaptlab.findings.claims import CLAIMED_LR_RATIO, LR_RATIO_TOLERANCE

    def swept(name: str, method: str, best: float) -> dict[str, Any]:
        a = arm(name, method, 0.4, 0.1)
        grid = [best / 9, best / 3, best, best * 3, best * 9]
        a["lr_sweep"] = {"best_lr": best, "best_at_edge": False, "points": [{"lr": x} for x in grid]}
        return a

    assert (CLAIMED_LR_RATIO / LR_RATIO_TOLERANCE, CLAIMED_LR_RATIO * LR_RATIO_TOLERANCE) == (10 / 3.5, 35.0)
    full = swept("full", "full", 1e-5)
    # the interval [ratio / 3, ratio * 3]: inside [2.86, 35] agrees, wholly outside disagrees
    for ratio, verdict in ((10.0, "agrees"), (3.0, "cannot tell"), (0.5, "disagrees"), (200.0, "disagrees")):
        f = finding(recommend(results(full, swept("lora", "lora", 1e-5 * ratio))), "lr_ratio")
        assert f["verdict"] == verdict, ratio
        assert f["ci95"] == pytest.approx([ratio / 3, ratio * 3])


def test_a_learning_tie_says_whether_it_forgets_distinguishably_more() -> None:
    # b and c learn as much as a (overlapping intervals); b forgets more beyond the intervals, c within them
    a, b, c = arm("a", "full", 0.50, 0.10), arm("b", "lora", 0.495, 0.30), arm("c", "dora", 0.495, 0.105)
    rec = recommend(results(a, b, c))
    assert rec["pick"] == "a"
    reason = rec["pick_reason"]
    assert "b, c are shown to learn about as much as it" in reason
    assert "b forgets more (b - a = +0.2000" in reason
    assert "c is not distinguishable (c - a = +0.0050" in reason
