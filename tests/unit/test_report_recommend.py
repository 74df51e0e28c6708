"""The recommendation is computed from the numbers: Pareto frontier, CI overlap, findings' verdicts."""

from __future__ import annotations

from typing import Any

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


def test_overlapping_learning_cis_pick_the_arm_that_forgets_less_and_say_inconclusive() -> None:
    rec = recommend(
        results(arm("full", "full", 0.31, 0.20, half=0.05), arm("lora", "lora", 0.30, 0.05, half=0.05))
    )
    assert rec["pick"] == "lora"
    assert "not distinguishable" in rec["pick_reason"]
    assert finding(rec, "learns_less")["verdict"] == "inconclusive"
    assert finding(rec, "forgets_less")["verdict"] == "agrees"


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
    assert finding(rec, "targets")["verdict"] == "inconclusive"


def test_findings_without_the_arms_that_test_them_are_not_tested() -> None:
    rec = recommend(results(arm("full", "full", 0.5, 0.2), arm("lora", "lora", 0.3, 0.05)))
    for fid in ("lr_ratio", "targets", "batch", "data_size", "rank", "intruders"):
        assert finding(rec, fid)["verdict"] == "not tested"


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
        finding(recommend(results(full, lora)), "lr_ratio")["verdict"] == "inconclusive"
    )  # at the grid's edge


def test_batch_sensitivity_compares_drops_with_their_uncertainty() -> None:
    arms = [
        arm("full-small", "full", 0.50, 0.1, batch=1),
        arm("full-large", "full", 0.49, 0.1, grad_accum=4),
        arm("lora-small", "lora", 0.50, 0.1, batch=1),
        arm("lora-large", "lora", 0.20, 0.1, grad_accum=4),
    ]
    assert finding(recommend(results(*arms)), "batch")["verdict"] == "agrees"
    arms[3] = arm("lora-large", "lora", 0.48, 0.1, grad_accum=4)
    assert finding(recommend(results(*arms)), "batch")["verdict"] == "inconclusive"


def test_data_size_crossover() -> None:
    arms = [
        arm("full-1", "full", 0.10, 0.1, data_fraction=0.01),
        arm("lora-1", "lora", 0.20, 0.1, data_fraction=0.01),
        arm("full-100", "full", 0.60, 0.1, data_fraction=1.0),
        arm("lora-100", "lora", 0.30, 0.1, data_fraction=1.0),
    ]
    f = finding(recommend(results(*arms)), "data_size")
    assert f["verdict"] == "agrees"
    assert "sign flips at 100%" in f["evidence"][0]


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


def test_one_distinguishable_pair_among_overlapping_ones_only_partly_agrees():
    from adaptlab.report.recommend import _overall

    assert _overall(["agrees", "agrees"]) == "agrees"
    assert _overall(["agrees", "inconclusive", "inconclusive"]) == "partly agrees"
    assert _overall(["disagrees", "inconclusive"]) == "partly disagrees"
    assert _overall(["agrees", "disagrees", "inconclusive"]) == "mixed"
    assert _overall(["inconclusive"]) == "inconclusive"


def test_relation_at_touching_and_barely_separated_intervals() -> None:
    assert relation([0.3, 0.4], [0.1, 0.3]) == "overlap"  # a shared endpoint is not a separation
    assert relation([0.30001, 0.4], [0.1, 0.3]) == "above"
    assert relation([0.1, 0.3], [0.3, 0.5]) == "overlap"
    assert relation([0.1, 0.29999], [0.3, 0.5]) == "below"


def test_verdicts_follow_the_intervals_not_the_point_estimates() -> None:
    """The same point estimates give agrees or inconclusive depending only on the interval widths."""
    narrow = recommend(
        results(arm("full", "full", 0.50, 0.20, half=0.04), arm("lora", "lora", 0.40, 0.10, half=0.04))
    )
    wide = recommend(
        results(arm("full", "full", 0.50, 0.20, half=0.06), arm("lora", "lora", 0.40, 0.10, half=0.06))
    )
    for fid in ("learns_less", "forgets_less"):
        assert finding(narrow, fid)["verdict"] == "agrees"
        assert finding(wide, fid)["verdict"] == "inconclusive"
    assert narrow["pick"] == "full" and wide["pick"] == "lora"  # within the interval: forgets less wins


def test_each_lora_arm_gets_its_own_verdict_in_the_overall_one() -> None:
    arms = [
        arm("full", "full", 0.50, 0.20),
        arm("lora", "lora", 0.30, 0.05),  # learns distinguishably less, forgets less
        arm("dora", "dora", 0.49, 0.19),  # not distinguishable
    ]
    rec = recommend(results(*arms))
    assert finding(rec, "learns_less")["verdict"] == "partly agrees"
    assert len(finding(rec, "learns_less")["evidence"]) == 2
    arms[2] = arm("dora", "dora", 0.70, 0.30)  # learns more and forgets more than full
    rec = recommend(results(*arms))
    assert finding(rec, "learns_less")["verdict"] == "mixed"
    assert finding(rec, "forgets_less")["verdict"] == "mixed"


def test_lr_ratio_far_from_ten_disagrees() -> None:
    from adaptlab.report.recommend import CLAIMED_LR_RATIO, LR_RATIO_TOLERANCE

    def swept(name: str, method: str, best: float) -> dict[str, Any]:
        a = arm(name, method, 0.4, 0.1)
        a["lr_sweep"] = {"best_lr": best, "best_at_edge": False, "points": []}
        return a

    full = swept("full", "full", 1e-5)
    for ratio, verdict in (
        (1.0, "disagrees"),
        (CLAIMED_LR_RATIO / LR_RATIO_TOLERANCE * 0.9, "disagrees"),
        (CLAIMED_LR_RATIO / LR_RATIO_TOLERANCE * 1.1, "agrees"),
        (CLAIMED_LR_RATIO * LR_RATIO_TOLERANCE * 0.9, "agrees"),
        (CLAIMED_LR_RATIO * LR_RATIO_TOLERANCE * 1.1, "disagrees"),
    ):
        rec = recommend(results(full, swept("lora", "lora", 1e-5 * ratio)))
        assert finding(rec, "lr_ratio")["verdict"] == verdict, ratio


def test_a_learning_tie_says_whether_it_forgets_distinguishably_more() -> None:
    # b and c learn as much as a (overlapping intervals); b forgets more beyond the intervals, c within them
    a, b, c = arm("a", "full", 0.50, 0.10), arm("b", "lora", 0.495, 0.30), arm("c", "dora", 0.495, 0.105)
    rec = recommend(results(a, b, c))
    assert rec["pick"] == "a"
    reason = rec["pick_reason"]
    assert "b, c are not distinguishable from it in learning" in reason
    assert "b forgets more (b - a = +0.2000" in reason
    assert "c is not distinguishable (c - a = +0.0050" in reason
