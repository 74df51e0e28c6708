"""The recommendation, computed from the measured numbers only: frontier, picks under limits, findings.

Nothing here is written in advance. Differences between arms carry a 95% interval paired over the
same held-out documents and seeds (findings.paired); results without per-document numbers fall back
to per-arm intervals. The pick is the best learner, or among the arms shown to learn about as much
as it (non-inferior within findings.claims.ABOUT_AS_MUCH of its learning: an interval that merely
contains 0 is not enough) the one that forgets least. Every published finding is judged by
findings.verdict, the function reproduce and plan read too: agrees, disagrees, cannot tell, or
not run (the comparison has no matched arms that test it).

    python -c "from adaptlab.report.recommend import pareto_frontier as p; print(p([('a', 1, 1), ('b', 2, 2)]))"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from adaptlab.findings import REPORT_CLAIMS, decide, matched_pairs, verdict
from adaptlab.findings.claims import ABOUT_AS_MUCH
from adaptlab.findings.paired import difference, fmt_diff, resolve, sign_of
from adaptlab.findings.pairs import is_full, is_lora_family

Relation = Literal["above", "below", "overlap"]

SAME_MEMORY_STEP = 1.02
"""Memory ladder steps within 2% of the previous one are the same memory limit in practice."""
BYTES_PER_GB = 1e9


def pareto_frontier(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Names of the (name, learning, forgetting) points no other point dominates.

    A dominates B when A learns at least as much and forgets at most as much, and is strictly
    better in one of the two. Returned in order of increasing forgetting.
    """
    front = []
    for name, learn, forget in points:
        dominated = any(
            (l2 >= learn and f2 <= forget) and (l2 > learn or f2 < forget)
            for n2, l2, f2 in points
            if n2 != name
        )
        if not dominated:
            front.append((forget, -learn, name))
    return [name for _, _, name in sorted(front)]


def relation(a: Sequence[float], b: Sequence[float]) -> Relation:
    """Interval a against interval b: entirely above, entirely below, or overlapping."""
    if a[0] > b[1]:
        return "above"
    if a[1] < b[0]:
        return "below"
    return "overlap"


def _fig(f: dict[str, Any]) -> str:
    lo, hi = f["ci95"]
    return f"{f['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def _diff(d: dict[str, Any] | None) -> str:
    """A difference with its interval, saying whether it is paired."""
    if d is None:
        return "n/a"
    return fmt_diff(d) + ("" if d.get("paired") else " (unpaired)")


def learns_about_as_much(a: dict[str, Any], ref: dict[str, Any], fm: str) -> bool:
    """True when a's learning is shown non-inferior to ref's within ABOUT_AS_MUCH of ref's own learning
    (the paired interval of a - ref stays above -margin); not distinguishable is not enough."""
    d = difference(a, ref, "learning", fm)
    margin = ABOUT_AS_MUCH * abs(ref["learning"]["value"])
    return d is not None and decide("non-inferiority", d["ci95"], margin) == "agrees"


def _rank_vs_full(arms: list[dict[str, Any]], fm: str) -> str | None:
    """The smallest LoRA rank shown to learn about as much as a full arm it is matched with."""
    pairs = matched_pairs(arms, "method", is_lora_family, is_full)
    if not pairs:
        return None
    shown = [lo["config"]["rank"] for lo, full in pairs if learns_about_as_much(lo, full, fm)]
    return (
        f"smallest rank shown to learn about as much as full fine-tuning (non-inferior within "
        f"{100 * ABOUT_AS_MUCH:g}% of its learning): " + (f"r{min(shown)}" if shown else "none at this size")
    )


def findings_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every claim a comparison can test, judged by findings.verdict on these results."""
    out = []
    for claim in REPORT_CLAIMS:
        f = verdict(claim, results).to_dict()
        if claim.id == "rank" and f["verdict"] != "not run":
            extra = _rank_vs_full(_ok(results), results.get("forgetting_metric", "drift_kl"))
            f["evidence"] += [extra] if extra else []
        out.append(f)
    return out


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        a
        for a in results["arms"]
        if a.get("status") == "ok" and a.get("forgetting", {}).get("value") is not None
    ]


def _ladder_forgetting(ok: list[dict[str, Any]], frontier: list[str]) -> list[dict[str, Any]]:
    by = {a["name"]: a for a in ok}
    return [
        {"limit_from": by[n]["forgetting"]["value"], "pick": n, "learning": by[n]["learning"]["value"]}
        for n in frontier
    ]


def _ladder_memory(ok: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    best = None
    for a in sorted(ok, key=lambda a: (a["cost"]["peak_mem_bytes"], -a["learning"]["value"])):
        if best is None or a["learning"]["value"] > best["learning"]["value"]:
            best = a
            if out and a["cost"]["peak_mem_bytes"] <= SAME_MEMORY_STEP * out[-1]["limit_from_bytes"]:
                out.pop()
            out.append(
                {
                    "limit_from_bytes": a["cost"]["peak_mem_bytes"],
                    "pick": a["name"],
                    "learning": a["learning"]["value"],
                }
            )
    return out


def _best_under(ok: list[dict[str, Any]], fits: Any) -> dict[str, Any] | None:
    cands = [a for a in ok if fits(a)]
    return max(cands, key=lambda a: a["learning"]["value"]) if cands else None


def _vs_pick(ok: list[dict[str, Any]], pick: dict[str, Any], fm: str) -> list[dict[str, Any]]:
    """Each other arm minus the pick: learning, forgetting and every other forgetting measure, paired."""
    rows = []
    extra = ["general_nll", "drift_kl"] + [f"mc:{k}" for k in (pick.get("forgetting") or {}).get("mc") or {}]
    for a in ok:
        if a is pick:
            continue
        row: dict[str, Any] = {
            "arm": a["name"],
            "learning": difference(a, pick, "learning", fm),
            "forgetting": difference(a, pick, "forgetting", fm),
        }
        primary = resolve("forgetting", fm, pick)
        for m in extra:
            if m != primary:
                d = difference(a, pick, m, fm)
                if d is not None:
                    row[m] = d
        rows.append(row)
    return rows


def _forgetting_vs(a: dict[str, Any], best: dict[str, Any], metric: str) -> str:
    """How a learning-tied arm's forgetting compares with the best learner's, by its paired interval."""
    d = difference(a, best, "forgetting", metric)
    word = {
        "above": "forgets more",
        "below": "forgets less",
        "overlap": "is not distinguishable",
    }[sign_of(d)]
    return f"{a['name']} {word} ({a['name']} - {best['name']} = {_diff(d)})"


def recommend(results: dict[str, Any]) -> dict[str, Any]:
    """Frontier, pick, picks under limits and per-finding verdicts, with the reasons in words."""
    ok = _ok(results)
    metric = results.get("forgetting_metric", "drift_kl")
    unit = {"general_nll": "general NLL increase", "drift_kl": "drift KL", "mc_acc_drop": "MC accuracy drop"}[
        metric
    ]
    if not ok:
        return {
            "pick": None,
            "frontier": [],
            "findings": [],
            "summary": "No arm finished: nothing to recommend.",
        }
    frontier = pareto_frontier([(a["name"], a["learning"]["value"], a["forgetting"]["value"]) for a in ok])
    best = max(ok, key=lambda a: a["learning"]["value"])
    ties = [a for a in ok if a is best or learns_about_as_much(a, best, metric)]
    pick = min(ties, key=lambda a: (a["forgetting"]["value"], a["cost"]["peak_mem_bytes"]))
    if pick is best:
        reason = f"{pick['name']} learned the most ({_fig(pick['learning'])} nats/token)"
        others = [a for a in ties if a is not best]
        if others:
            one = len(others) == 1
            reason += (
                f"; {', '.join(a['name'] for a in others)} {'is' if one else 'are'} shown to learn "
                f"about as much as it (within {100 * ABOUT_AS_MUCH:g}% of its learning, paired difference); "
                "in forgetting, " + ", ".join(_forgetting_vs(a, best, metric) for a in others)
            )
        elif len(ok) > 1:
            reason += (
                "; no other arm is shown to learn about as much "
                f"(within {100 * ABOUT_AS_MUCH:g}% of its learning, paired differences)"
            )
    else:
        d = difference(pick, best, "learning", metric)
        reason = (
            f"{pick['name']} learned {_fig(pick['learning'])}, shown to learn about as much as the best "
            f"({best['name']}, {_fig(best['learning'])}; {pick['name']} - {best['name']} = {_diff(d)}), "
            f"and forgets least among those ({pick['name']} - {best['name']} in {unit}: "
            f"{_diff(difference(pick, best, 'forgetting', metric))})"
        )
    rec: dict[str, Any] = {
        "frontier": frontier,
        "best_learning": best["name"],
        "least_forgetting": min(ok, key=lambda a: a["forgetting"]["value"])["name"],
        "pick": pick["name"],
        "pick_reason": reason,
        "learns_about_as_much_as_best": [a["name"] for a in ties],
        "forgetting_metric": metric,
        "forgetting_ladder": _ladder_forgetting(ok, frontier),
        "memory_ladder": _ladder_memory(ok),
        "vs_pick": _vs_pick(ok, pick, metric),
    }
    limits = results.get("limits") or {}
    if limits.get("forgetting") is not None:
        lim = limits["forgetting"]
        a = _best_under(ok, lambda a: a["forgetting"]["value"] <= lim)
        rec["under_forgetting_limit"] = {
            "limit": lim,
            "pick": a["name"] if a else None,
            "ci_within": bool(a and a["forgetting"]["ci95"][1] <= lim),
        }
    if limits.get("memory_gb") is not None:
        lim_b = limits["memory_gb"] * BYTES_PER_GB
        a = _best_under(ok, lambda a: a["cost"]["peak_mem_bytes"] <= lim_b)
        rec["under_memory_limit"] = {"limit_gb": limits["memory_gb"], "pick": a["name"] if a else None}
    findings = findings_of(results)
    rec["findings"] = findings
    rec["summary"] = _summary(rec, ok, unit)
    return rec


def _summary(rec: dict[str, Any], ok: list[dict[str, Any]], unit: str) -> str:
    by = {a["name"]: a for a in ok}
    lines = [f"Recommendation: {rec['pick']}. {rec['pick_reason']}."]
    lines.append(
        "Pareto frontier (learning vs "
        + unit
        + "): "
        + ", ".join(
            f"{n} ({by[n]['learning']['value']:.4f} / {by[n]['forgetting']['value']:.4f})"
            for n in rec["frontier"]
        )
        + "."
    )
    ladders: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("forgetting", lambda s: f"{unit} <= {s['limit_from']:.4f}"),
        ("memory", lambda s: f">= {s['limit_from_bytes'] / BYTES_PER_GB:.2f} GB"),
    ]
    for name, limit in ladders:
        if len(ladder := rec[f"{name}_ladder"]) > 1:
            lines.append(
                f"Under a {name} limit: " + "; ".join(f"{limit(s)}: {s['pick']}" for s in ladder) + "."
            )
    for key, what in (("under_forgetting_limit", "limit"), ("under_memory_limit", "limit_gb")):
        if key in rec:
            r = rec[key]
            lines.append(
                f"With your {key.replace('under_', '').replace('_', ' ')} {r[what]:g}: {r['pick'] or 'no arm fits'}."
            )
    tested = [f for f in rec["findings"] if f["verdict"] != "not run"]
    if tested:
        lines.append(
            "Published findings: " + "; ".join(f"{f['claim']}: {f['verdict_text']}" for f in tested) + "."
        )
    return "\n".join(lines)
