"""The recommendation, computed from the measured numbers only: frontier, picks under limits, findings.

Nothing here is written in advance. Two arms are "distinguishable" when the 95% interval of their
difference, paired over the same held-out documents and seeds (report.paired), excludes 0; results
without per-document numbers fall back to per-arm intervals that do not overlap. Every published
finding gets a verdict from those differences: agrees, disagrees, partly agrees (or disagrees: some
pairs distinguishable, the rest not), mixed, inconclusive (the difference's interval contains 0) or
not tested (the comparison has no arms that test it).

    python -c "from adaptlab.report.recommend import pareto_frontier as p; print(p([('a', 1, 1), ('b', 2, 2)]))"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from adaptlab.report.paired import contrast, difference, fmt_diff, resolve, sign_of

Relation = Literal["above", "below", "overlap"]

CLAIMED_LR_RATIO = 10.0
"""LoRA's optimal LR over full fine-tuning's, as "LoRA Without Regret" reports it."""
LR_RATIO_TOLERANCE = 3.5
"""A measured ratio within this factor of the claim agrees (sweep grids step by ~3x, so one grid step)."""
SAME_MEMORY_STEP = 1.02
"""Memory ladder steps within 2% of the previous one are the same memory limit in practice."""
BYTES_PER_GB = 1e9

BIDERMAN = "Biderman et al. 2024, LoRA Learns Less and Forgets Less (arXiv 2405.09673)"
REGRET = 'Schulman et al. 2025, "LoRA Without Regret" (Thinking Machines)'
SHUTTLEWORTH = (
    "Shuttleworth et al. 2024, LoRA vs Full Fine-tuning: An Illusion of Equivalence (arXiv 2410.21228)"
)


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


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fig(f: dict[str, Any]) -> str:
    lo, hi = f["ci95"]
    return f"{f['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def _half(f: dict[str, Any]) -> float:
    return (f["ci95"][1] - f["ci95"][0]) / 2


def _global_batch(a: dict[str, Any]) -> int:
    return a["config"]["batch"] * a["config"]["grad_accum"]


def _context(a: dict[str, Any]) -> tuple[int, float | None]:
    return (_global_batch(a), a["config"].get("data_fraction"))


def _overall(verdicts: list[str]) -> str:
    if not verdicts:
        return "not tested"
    agree, disagree = "agrees" in verdicts, "disagrees" in verdicts
    if agree and disagree:
        return "mixed"
    # One distinguishable pair among indistinguishable ones is not the finding holding in this run.
    some = "inconclusive" in verdicts
    if agree:
        return "partly agrees" if some else "agrees"
    if disagree:
        return "partly disagrees" if some else "disagrees"
    return "inconclusive"


def _finding(fid: str, claim: str, source: str, verdict: str, evidence: list[str]) -> dict[str, Any]:
    return {"id": fid, "claim": claim, "source": source, "verdict": verdict, "evidence": evidence}


def _full_vs_lora(arms: list[dict[str, Any]], metric: str, fm: str) -> tuple[list[str], list[str]]:
    """Verdicts and evidence for full vs each LoRA-family arm trained on the same batch and data."""
    verdicts, evidence = [], []
    verb = "learned" if metric == "learning" else "forgot"
    for f in (a for a in arms if a["method"] == "full"):
        for lo in (a for a in arms if a["method"] != "full" and _context(a) == _context(f)):
            d = difference(f, lo, metric, fm)
            rel = sign_of(d)
            verdicts.append({"above": "agrees", "below": "disagrees", "overlap": "inconclusive"}[rel])
            word = {
                "above": f"{verb} more than",
                "below": f"{verb} less than",
                "overlap": "is not distinguishable from",
            }[rel]
            evidence.append(f"{f['name']} {word} {lo['name']}: {f['name']} - {lo['name']} = {_diff(d)}")
    return verdicts, evidence


def _diff(d: dict[str, Any] | None) -> str:
    """A difference with its interval, saying whether it is paired."""
    if d is None:
        return "n/a"
    return fmt_diff(d) + ("" if d.get("paired") else " (unpaired)")


def _lr_ratio(results: dict[str, Any], arms: list[dict[str, Any]]) -> dict[str, Any]:
    claim = f"LoRA's best learning rate is about {CLAIMED_LR_RATIO:g}x full fine-tuning's"
    swept = [a for a in arms if a.get("lr_sweep") and a["lr_sweep"].get("best_lr")]
    full = [a for a in swept if a["method"] == "full"]
    lora = [a for a in swept if a["method"] != "full"]
    if not (full and lora):
        return _finding(
            "lr_ratio",
            claim,
            REGRET,
            "not tested",
            [results.get("lr_rule", "") + "; run `--study lr` to measure the optimal ratio on this data"],
        )
    f = full[0]["lr_sweep"]
    verdicts, evidence = [], []
    for a in lora:
        s = a["lr_sweep"]
        ratio = s["best_lr"] / f["best_lr"]
        if s.get("best_at_edge") or f.get("best_at_edge"):
            verdicts.append("inconclusive")
            evidence.append(
                f"measured ratio {a['name']}/{full[0]['name']} = {ratio:.3g} ({s['best_lr']:.2g} / {f['best_lr']:.2g}), "
                "but a best LR lies at the edge of its sweep, so the optimum may lie outside it"
            )
        else:
            low, high = CLAIMED_LR_RATIO / LR_RATIO_TOLERANCE, CLAIMED_LR_RATIO * LR_RATIO_TOLERANCE
            verdicts.append("agrees" if low <= ratio <= high else "disagrees")
            evidence.append(
                f"measured optimal-LR ratio {a['name']}/{full[0]['name']} = {ratio:.3g} "
                f"({s['best_lr']:.2g} / {f['best_lr']:.2g}, best by validation loss; grid steps limit its precision)"
            )
    return _finding("lr_ratio", claim, REGRET, _overall(verdicts), evidence)


def _targets(arms: list[dict[str, Any]], fm: str) -> dict[str, Any]:
    claim = "LoRA on all layers (incl. MLP) learns more than attention-only LoRA at matched trainable params"
    lora = [a for a in arms if a["method"] in ("lora", "lora+rslora", "dora", "qlora")]
    alls = [a for a in lora if a["config"].get("targets") == "all-linear" and a["method"] == "lora"]
    attn = [a for a in lora if a["config"].get("targets") == "attention"]
    if not (alls and attn):
        return _finding(
            "targets", claim, REGRET, "not tested", ["no all-linear and attention-only LoRA arms to compare"]
        )
    verdicts, evidence = [], []
    for at in attn:
        same = [a for a in alls if _context(a) == _context(at) and a["method"] == at["method"]] or alls
        al = same[0]
        d = difference(al, at, "learning", fm)
        verdicts.append({"above": "agrees", "below": "disagrees", "overlap": "inconclusive"}[sign_of(d)])
        evidence.append(
            f"{al['name']} (all-linear, {al['cost']['trainable_params']:,} params) {_fig(al['learning'])} vs "
            f"{at['name']} (attention, {at['cost']['trainable_params']:,} params) {_fig(at['learning'])}; "
            f"difference {_diff(d)}"
        )
    for m in (a for a in lora if a["config"].get("targets") == "mlp"):
        evidence.append(f"MLP-only {m['name']}: {_fig(m['learning'])}")
    return _finding("targets", claim, REGRET, _overall(verdicts), evidence)


def _batch(arms: list[dict[str, Any]], fm: str) -> dict[str, Any]:
    claim = "LoRA loses more than full fine-tuning when the batch grows (batch-size sensitivity)"
    ends: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    evidence = []
    for family in ("full", "lora"):
        group = [
            a
            for a in arms
            if (a["method"] == "full") == (family == "full") and a["config"].get("data_fraction") is None
        ]
        group = [a for a in group if a["method"] in ("full", "lora")]
        sizes = sorted({_global_batch(a) for a in group})
        if len(sizes) < 2:
            continue
        small = next(a for a in group if _global_batch(a) == sizes[0])
        large = next(a for a in group if _global_batch(a) == sizes[-1])
        ends[family] = (small, large)
        drop = difference(small, large, "learning", fm)
        evidence.append(
            f"{family}: learning at batch {sizes[0]} {_fig(small['learning'])}, at batch {sizes[-1]} "
            f"{_fig(large['learning'])}, drop {_diff(drop)}"
        )
    if len(ends) < 2:
        return _finding(
            "batch", claim, REGRET, "not tested", ["needs full and LoRA arms at two or more batch sizes"]
        )
    (ls, ll), (fs, fl) = ends["lora"], ends["full"]
    d = contrast([(1.0, ls), (-1.0, ll), (-1.0, fs), (1.0, fl)], "learning", fm)
    verdict = {"above": "agrees", "below": "disagrees", "overlap": "inconclusive"}[sign_of(d)]
    evidence.append(f"LoRA's drop minus full's: {_diff(d)}")
    return _finding("batch", claim, REGRET, verdict, evidence)


def _data_size(arms: list[dict[str, Any]], fm: str) -> dict[str, Any]:
    claim = "LoRA matches or beats full fine-tuning on small data; full fine-tuning pulls ahead as data grows"
    sized = [a for a in arms if a["config"].get("data_fraction") is not None]
    fracs = sorted({a["config"]["data_fraction"] for a in sized})
    if len(fracs) < 2:
        return _finding(
            "data_size", claim, BIDERMAN, "not tested", ["needs arms on two or more data fractions"]
        )
    verdicts, evidence = [], []
    lora_keys = sorted(
        {(a["method"], a["config"].get("rank")) for a in sized if a["method"] != "full"}, key=str
    )
    for method, rank in lora_keys:
        pairs = []
        for fr in fracs:
            f = next((a for a in sized if a["method"] == "full" and a["config"]["data_fraction"] == fr), None)
            lo = next(
                (
                    a
                    for a in sized
                    if a["method"] == method
                    and a["config"].get("rank") == rank
                    and a["config"]["data_fraction"] == fr
                ),
                None,
            )
            if f and lo:
                pairs.append((fr, f, lo, difference(f, lo, "learning", fm)))
        if len(pairs) < 2:
            continue
        (_, f0, l0, _), (_, f1, l1, _) = pairs[0], pairs[-1]
        change = contrast([(1.0, f1), (-1.0, l1), (-1.0, f0), (1.0, l0)], "learning", fm)
        verdicts.append({"above": "agrees", "below": "disagrees", "overlap": "inconclusive"}[sign_of(change)])
        gaps = [(fr, d["value"] if d else float("nan")) for fr, _, _, d in pairs]
        cross = [b[0] for a, b in zip(gaps, gaps[1:], strict=False) if (a[1] <= 0) != (b[1] <= 0)]
        evidence.append(
            f"full minus {method} r{rank}: "
            + ", ".join(f"{100 * fr:g}% {_diff(d)}" for fr, _, _, d in pairs)
            + f"; change {_diff(change)}"
            + (
                f"; the sign flips at {100 * cross[0]:g}% of the data"
                if cross
                else "; no crossover in this range"
            )
        )
    return _finding(
        "data_size", claim, BIDERMAN, _overall(verdicts), evidence or ["no full/LoRA pair per fraction"]
    )


def _rank(arms: list[dict[str, Any]], fm: str) -> dict[str, Any]:
    claim = "Higher LoRA rank learns more (capacity), approaching full fine-tuning"
    plain = [a for a in arms if a["method"] == "lora" and a["config"].get("targets") == "all-linear"]
    plain = [a for a in plain if a["config"].get("data_fraction") is None]
    ranks = sorted({a["config"]["rank"] for a in plain})
    if len(ranks) < 3:
        return _finding("rank", claim, BIDERMAN, "not tested", ["needs LoRA arms at three or more ranks"])
    low = next(a for a in plain if a["config"]["rank"] == ranks[0])
    high = next(a for a in plain if a["config"]["rank"] == ranks[-1])
    d = difference(high, low, "learning", fm)
    rel = sign_of(d)
    evidence = [
        ", ".join(
            f"r{a['config']['rank']} {a['learning']['value']:.4f}"
            for a in sorted(plain, key=lambda a: a["config"]["rank"])
        )
        + f"; r{ranks[-1]} - r{ranks[0]} = {_diff(d)}"
    ]
    full = [a for a in arms if a["method"] == "full"]
    if full:
        match = [a for a in plain if sign_of(difference(a, full[0], "learning", fm)) != "below"]
        evidence.append(
            f"smallest rank not distinguishable from (or above) {full[0]['name']}: "
            + (f"r{min(a['config']['rank'] for a in match)}" if match else "none")
        )
    verdict = {"above": "agrees", "below": "disagrees", "overlap": "inconclusive"}[rel]
    return _finding("rank", claim, BIDERMAN, verdict, evidence)


def _intruders(arms: list[dict[str, Any]]) -> dict[str, Any]:
    claim = "LoRA introduces intruder dimensions that full fine-tuning does not"
    with_an = [a for a in arms if a.get("analysis") and a["analysis"].get("intruders_per_layer") is not None]
    full = [a for a in with_an if a["method"] == "full"]
    lora = [a for a in with_an if a["method"] != "full"]
    if not (full and lora):
        return _finding(
            "intruders", claim, SHUTTLEWORTH, "not tested", ["needs the analysis of a full and a LoRA arm"]
        )
    f = full[0]["analysis"]
    evidence = [
        f"{a['name']}: {a['analysis']['intruders']} intruders in {a['analysis']['layers']} layers"
        for a in full[:1] + lora
    ]
    if f["intruders"] == 0 and all(a["analysis"]["intruders"] == 0 for a in lora):
        verdict = "inconclusive"
        evidence.append("no arm shows intruder dimensions at this budget (the paper trains to convergence)")
    else:
        verdicts = [
            "agrees" if a["analysis"]["intruders_per_layer"] > f["intruders_per_layer"] else "disagrees"
            for a in lora
        ]
        verdict = _overall(verdicts)
        evidence.append("counts have no confidence interval: one training per arm")
    return _finding("intruders", claim, SHUTTLEWORTH, verdict, evidence)


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
    ok = [
        a
        for a in results["arms"]
        if a.get("status") == "ok" and a.get("forgetting", {}).get("value") is not None
    ]
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
    ties = [a for a in ok if a is best or sign_of(difference(best, a, "learning", metric)) != "above"]
    pick = min(ties, key=lambda a: (a["forgetting"]["value"], a["cost"]["peak_mem_bytes"]))
    if pick is best:
        reason = f"{pick['name']} learned the most ({_fig(pick['learning'])} nats/token)"
        others = [a for a in ties if a is not best]
        if others:
            one = len(others) == 1
            reason += (
                f"; {', '.join(a['name'] for a in others)} {'is' if one else 'are'} not distinguishable "
                "from it in learning (paired difference); in forgetting, "
                + ", ".join(_forgetting_vs(a, best, metric) for a in others)
            )
        elif len(ok) > 1:
            reason += ", distinguishably more than every other arm (paired differences)"
    else:
        d = difference(pick, best, "learning", metric)
        reason = (
            f"{pick['name']} learned {_fig(pick['learning'])}, not distinguishable from the best "
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
        "not_distinguishable_from_best": [a["name"] for a in ties],
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
    learn_v, learn_e = _full_vs_lora(ok, "learning", metric)
    forget_v, forget_e = _full_vs_lora(ok, "forgetting", metric)
    findings = [
        _finding(
            "learns_less",
            "LoRA learns less than full fine-tuning",
            BIDERMAN,
            _overall(learn_v),
            learn_e or ["needs a full and a LoRA arm on the same batch and data"],
        ),
        _finding(
            "forgets_less",
            f"LoRA forgets less than full fine-tuning ({unit})",
            BIDERMAN,
            _overall(forget_v),
            forget_e or ["needs a full and a LoRA arm on the same batch and data"],
        ),
        _lr_ratio(results, ok),
        _targets(ok, metric),
        _batch(ok, metric),
        _data_size(ok, metric),
        _rank(ok, metric),
        _intruders(ok),
    ]
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
    tested = [f for f in rec["findings"] if f["verdict"] != "not tested"]
    if tested:
        lines.append(
            "Published findings: " + "; ".join(f"{f['claim']}: {f['verdict']}" for f in tested) + "."
        )
    return "\n".join(lines)
