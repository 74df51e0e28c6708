"""The one verdict function: a claim (claims.py) judged on a comparison's results.json.

    verdict(claim, results) -> Verdict: agrees | disagrees | cannot tell | not run

The contrast is pooled over matched pairs only (pairs.py): the mean of side a minus side b over
every pair, its 95% interval paired over the same held-out documents and seeds (paired.py; seed
spread is part of it). The test reads the interval:

    superiority      agrees when the whole interval lies above 0, disagrees when it lies below,
                     else cannot tell
    non-inferiority  agrees when its lower end stays above -margin, disagrees when the whole
                     interval lies below -margin, else cannot tell
    equivalence      agrees only when the whole interval lies inside +-margin, disagrees when it lies
                     wholly outside, else cannot tell (an interval that straddles 0 but is wider
                     than the margin says nothing about sameness)

A verdict from one seed is "unreplicated": its interval covers the documents, not the training.

    python -c "from adaptlab.findings import CLAIMS, verdict; print(verdict(CLAIMS[0], {'arms': []}))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from adaptlab.findings.claims import Claim, Test
from adaptlab.findings.paired import columns, contrast, difference, figure, fmt_diff, resolve
from adaptlab.findings.pairs import Arm, matched, matched_pairs

Outcome = Literal["agrees", "disagrees", "cannot tell", "not run"]
Pair = tuple[Arm, Arm]


@dataclass(frozen=True)
class Verdict:
    """A claim judged on one comparison: the outcome, the estimate and its interval, what it rests on."""

    claim: Claim
    verdict: Outcome
    estimate: float | None = None
    ci95: tuple[float, float] | None = None
    margin: float | None = None
    """In the estimate's units (a factor either way of the claimed ratio for lr_ratio); 0: superiority."""
    pairs: tuple[tuple[str, ...], ...] = ()
    n_seeds: int | None = None
    n_docs: int | None = None
    paired: bool | None = None
    """True: the interval is paired over the same documents; False: from per-arm intervals."""
    detail: str = ""
    evidence: tuple[str, ...] = ()

    @property
    def unreplicated(self) -> bool:
        return self.verdict != "not run" and self.n_seeds == 1

    @property
    def text(self) -> str:
        return self.verdict + (" (unreplicated: one seed)" if self.unreplicated else "")

    def to_dict(self) -> dict[str, Any]:
        c = self.claim
        return {
            "id": c.id,
            "claim": c.claim,
            "source": c.source,
            "verdict": self.verdict,
            "verdict_text": self.text,
            "test": c.test,
            "matched_on": list(c.contrast.matched_on),
            "margin": self.margin,
            "value": self.estimate,
            "ci95": list(self.ci95) if self.ci95 else None,
            "pairs": [list(p) for p in self.pairs],
            "n_seeds": self.n_seeds,
            "n_docs": self.n_docs,
            "unreplicated": self.unreplicated,
            "paired": self.paired,
            "detail": self.detail,
            "evidence": list(self.evidence),
        }


def decide(test: Test, ci: tuple[float, float] | list[float], margin: float = 0.0) -> Outcome:
    """How a 95% interval of (claimed side - other side) reads under a test (module docstring)."""
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return "cannot tell"
    if test == "superiority":
        return "agrees" if lo > 0 else "disagrees" if hi < 0 else "cannot tell"
    if test == "non-inferiority":
        return "agrees" if lo > -margin else "disagrees" if hi < -margin else "cannot tell"
    if -margin < lo and hi < margin:
        return "agrees"
    return "disagrees" if lo > margin or hi < -margin else "cannot tell"


def _ok(results: dict[str, Any]) -> list[Arm]:
    return [a for a in results.get("arms", []) if a.get("status") == "ok" and "name" in a]


def _seeds(arm: Arm, metric: str, fm: str) -> int:
    if metric == "intruders_per_layer":  # the weight analysis reads the first seed's run only
        return 1
    if arm.get("runs"):
        return len(arm["runs"])
    cols = columns(arm, resolve(metric, fm, arm))
    if cols is not None:
        return int(cols[1].shape[0])
    return int(((arm.get("learning") or {}).get("spread") or {}).get("n") or 1)


def _docs(arm: Arm, metric: str, fm: str) -> int | None:
    cols = columns(arm, resolve(metric, fm, arm))
    if cols is not None:
        return int(cols[1].shape[1])
    f = figure(arm, metric) or {}
    return f.get("docs") or f.get("n")


def _counts(arms: list[Arm], metric: str, fm: str) -> tuple[int, int | None]:
    docs = [d for d in (_docs(a, metric, fm) for a in arms) if d]
    return min(_seeds(a, metric, fm) for a in arms), (min(docs) if docs else None)


def not_run(claim: Claim, why: str = "") -> Verdict:
    return Verdict(claim, "not run", evidence=(why or f"needs {claim.contrast.needs}",))


def _judge(
    claim: Claim,
    d: dict[str, Any],
    margin: float,
    pairs: list[tuple[str, ...]],
    arms: list[Arm],
    detail: str,
    evidence: list[str],
    fm: str,
) -> Verdict:
    """The verdict of a pooled contrast d = {value, ci95, paired}."""
    c = claim.contrast
    seeds, docs = _counts(arms, c.metric, fm)
    outcome = decide(claim.test, d["ci95"], margin)
    lines = [*evidence, f"{detail}: {fmt_diff(d)}" + ("" if d.get("paired", True) else " (unpaired)")]
    if seeds == 1 and docs is not None and docs < 2:  # a zero-width interval from one document, one seed
        outcome = "cannot tell"
        lines.append("one held-out document and one seed: the interval has nothing to vary over")
    if claim.test != "superiority":
        lines.append(f"{claim.test} margin +-{margin:.4g}")
    if seeds == 1:
        lines.append("one seed: the interval covers the held-out documents, not the training (unreplicated)")
    return Verdict(
        claim,
        outcome,
        float(d["value"]),
        (float(d["ci95"][0]), float(d["ci95"][1])),
        margin,
        tuple(pairs),
        seeds,
        docs,
        d.get("paired"),
        detail,
        tuple(lines),
    )


def _extremes(pairs: list[Pair], key: Any) -> list[Pair]:
    """Pairs whose first arm sits at the highest key and second at the lowest."""
    if not pairs:
        return []
    top, bottom = max(key(p[0]) for p in pairs), min(key(p[1]) for p in pairs)
    return [p for p in pairs if key(p[0]) == top and key(p[1]) == bottom]


def _margin(claim: Claim, refs: list[Arm]) -> float:
    if not claim.margin_relative:
        return claim.margin
    values = [(figure(a, claim.contrast.metric) or {}).get("value") for a in refs]
    values = [v for v in values if v is not None]
    return claim.margin * abs(float(np.mean(values))) if values else float("nan")


def _pooled(pairs: list[Pair], metric: str, fm: str, sign: float = 1.0) -> dict[str, Any] | None:
    """sign x mean over pairs of (a - b), paired over documents."""
    k = len(pairs)
    terms = [(sign / k, a) for a, _ in pairs] + [(-sign / k, b) for _, b in pairs]
    return contrast(terms, metric, fm)


def _difference(claim: Claim, arms: list[Arm], fm: str) -> Verdict:
    c = claim.contrast
    pairs = matched_pairs(arms, c.factor, c.a.pick, c.b.pick)
    if c.order is not None:
        pairs = _extremes([p for p in pairs if c.order(p[0]) > c.order(p[1])], c.order)
    d = _pooled(pairs, c.metric, fm) if pairs else None
    if d is None:
        return not_run(claim)
    evidence = [f"{a['name']} - {b['name']} = {_fmt(difference(a, b, c.metric, fm))}" for a, b in pairs]
    metric = f"forgetting ({fm})" if c.metric == "forgetting" else c.metric
    detail = f"{metric}: {c.a.what} - {c.b.what}" + (
        f", mean of {len(pairs)} pairs" if len(pairs) > 1 else ""
    )
    flat = [x for p in pairs for x in p]
    margin = _margin(claim, [b for _, b in pairs])
    return _judge(claim, d, margin, [(a["name"], b["name"]) for a, b in pairs], flat, detail, evidence, fm)


def _fmt(d: dict[str, Any] | None) -> str:
    return "n/a" if d is None else fmt_diff(d) + ("" if d.get("paired") else " (unpaired)")


def _quadruples(claim: Claim, arms: list[Arm]) -> list[tuple[Pair, Pair]]:
    """(high-end pair, low-end pair): each pair matched on the factor under test, the two ends matched
    on everything but `within` (and, chained, the low end continuing the high end)."""
    c = claim.contrast
    by_name = {a["name"]: a for a in arms}
    pairs = matched_pairs(arms, c.factor, c.a.pick, c.b.pick)
    out = []
    for p in pairs:
        for q in pairs:
            ends = c.high(p[0]) and c.high(p[1]) and c.low(q[0]) and c.low(q[1])
            if not ends or not all(matched(x, y, c.within, by_name) for x, y in zip(p, q, strict=True)):
                continue
            if c.chain and any((y.get("config") or {}).get("init_from") != x["name"] for x, y in zip(p, q)):
                continue
            # the high end lies above the low end; at equal keys only when the low end could not be a high
            # one (the regime study at a budget too small for two step counts: the regimes orient it)
            if c.order is not None and not (
                c.order(p[0]) > c.order(q[0]) or (c.order(p[0]) == c.order(q[0]) and not c.high(q[0]))
            ):
                continue
            out.append((p, q))
    if c.order is not None and out:
        top, bottom = max(c.order(p[0]) for p, _ in out), min(c.order(q[0]) for _, q in out)
        out = [(p, q) for p, q in out if c.order(p[0]) == top and c.order(q[0]) == bottom]
    return out


def _interaction(claim: Claim, arms: list[Arm], fm: str) -> Verdict:
    """Gap (a - b) at the high end minus the gap at the low end, pooled over matched quadruples."""
    c = claim.contrast
    quads = _quadruples(claim, arms)
    if not quads:
        return not_run(claim)
    high, low = [p for p, _ in quads], [q for _, q in quads]
    low_metric = c.low_metric or c.metric
    if low_metric == c.metric:
        d = contrast(
            [(w / len(quads), x) for p, q in quads for w, x in zip((1, -1, -1, 1), (*p, *q))], c.metric, fm
        )
    else:  # measured on other documents: each end paired within itself, the two combined in quadrature
        d = _sum_independent(_pooled(high, c.metric, fm), _pooled(low, low_metric, fm, -1.0))
    if d is None:
        return not_run(claim, f"a figure is missing for {claim.contrast.needs}")
    evidence = [
        f"gap {p[0]['name']} - {p[1]['name']} = {_fmt(difference(*p, c.metric, fm))}; "
        f"gap {q[0]['name']} - {q[1]['name']} = {_fmt(_pooled([q], low_metric, fm))}"
        for p, q in quads
    ]
    detail = f"{c.metric}: gap ({c.a.what} - {c.b.what}) at the high end of {'/'.join(c.within)} minus at the low end"
    flat = [x for p, q in quads for x in (*p, *q)]
    pairs = [(p[0]["name"], p[1]["name"], q[0]["name"], q[1]["name"]) for p, q in quads]
    return _judge(claim, d, claim.margin, pairs, flat, detail, evidence, fm)


def _sum_independent(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """a + b, each side of the interval widened in quadrature (figures on different documents)."""
    if a is None or b is None:
        return None
    value = a["value"] + b["value"]
    lo = math.hypot(a["value"] - a["ci95"][0], b["value"] - b["ci95"][0])
    hi = math.hypot(a["ci95"][1] - a["value"], b["ci95"][1] - b["value"])
    return {"value": value, "ci95": [value - lo, value + hi], "paired": False}


def _optimum_range(sweep: dict[str, Any]) -> tuple[float, float]:
    """Where the optimal LR lies given a sweep's best point: half a grid step (geometric) either side,
    the grid's own resolution; unbounded beyond a best point at the grid's edge."""
    lrs = sorted({float(p["lr"]) for p in sweep.get("points") or []})
    best = float(sweep["best_lr"])
    if best not in lrs or len(lrs) < 2:  # no grid kept: only whether the best point is at an edge
        return (0.0, math.inf) if sweep.get("best_at_edge") else (best, best)
    i = lrs.index(best)
    lo = math.sqrt(best * lrs[i - 1]) if i > 0 else 0.0
    hi = math.sqrt(best * lrs[i + 1]) if i < len(lrs) - 1 else math.inf
    return lo, hi


def _fitted_lr_ratio(claim: Claim, fitted: dict[str, Any]) -> Verdict:
    """The ratio of the two arms' fitted optima (compare/lr_fit.py: a parabola in log LR around each
    seed's best point; the interval a bootstrap over seeds), judged on a log scale around the claimed
    ratio. One seed gives no interval, and an optimum on its grid's edge is only a bound: cannot tell."""
    estimate, interval, seeds = fitted["estimate"], fitted.get("interval"), int(fitted.get("seeds") or 1)
    null, tol = math.log(claim.null), math.log(claim.margin)
    if interval is None or fitted.get("edge") or min(interval) <= 0:
        outcome: Outcome = "cannot tell"
    else:
        outcome = decide("equivalence", (math.log(interval[0]) - null, math.log(interval[1]) - null), tol)
    full, lora = fitted["arms"]
    return Verdict(
        claim,
        outcome,
        float(estimate),
        (float(interval[0]), float(interval[1])) if interval else None,
        claim.margin,
        ((lora, full),),
        seeds,
        None,
        None,
        "fitted optimal LR ratio LoRA / full (by validation loss, every seed swept)",
        (
            f"claimed {claim.null:g}x, agrees within a factor {claim.margin:g} either way "
            f"[{claim.null / claim.margin:.3g}, {claim.null * claim.margin:.3g}]",
            *([fitted["note"]] if fitted.get("note") else []),
        ),
    )


def _lr_ratio(claim: Claim, arms: list[Arm]) -> Verdict:
    """LoRA's best LR over full fine-tuning's, judged on a log scale around the claimed ratio."""
    c = claim.contrast
    pairs = [
        p
        for p in matched_pairs(arms, c.factor, c.a.pick, c.b.pick)
        if all(x["lr_sweep"].get("best_lr") for x in p)
    ]
    if not pairs:
        return not_run(claim)
    logs, evidence = [], []
    for lora, full in pairs:
        s, f = lora["lr_sweep"], full["lr_sweep"]
        (s_lo, s_hi), (f_lo, f_hi) = _optimum_range(s), _optimum_range(f)
        ratio = s["best_lr"] / f["best_lr"]
        lo = s_lo / f_hi if f_hi < math.inf else 0.0
        hi = s_hi / f_lo if f_lo > 0 else math.inf
        edge = lo == 0.0 or hi == math.inf
        logs.append([math.log(x) if x > 0 else -math.inf for x in (ratio, lo, hi)])
        evidence.append(
            f"best LR {lora['name']} / {full['name']} = {s['best_lr']:.2g} / {f['best_lr']:.2g} = {ratio:.3g}; "
            f"within half a grid step, the optimal ratio lies in [{lo:.3g}, {hi:.3g}]"
            + ("; a best LR at its sweep's edge: the optimum may lie beyond it" if edge else "")
        )
    mean = np.mean(np.asarray(logs), axis=0)  # pooled: the geometric mean over pairs
    ratio, lo, hi = (float(np.exp(x)) for x in mean)
    null, tol = math.log(claim.null), math.log(claim.margin)
    outcome = decide("equivalence", (math.log(lo) - null if lo > 0 else -math.inf, math.log(hi) - null), tol)
    evidence.append(
        f"claimed {claim.null:g}x, agrees within a factor {claim.margin:g} either way "
        f"[{claim.null / claim.margin:.3g}, {claim.null * claim.margin:.3g}]"
    )
    return Verdict(
        claim,
        outcome,
        ratio,
        (lo, hi),
        claim.margin,
        tuple((a["name"], b["name"]) for a, b in pairs),
        1,
        None,
        None,
        "best LR ratio LoRA / full (by validation loss)",
        tuple(evidence),
    )


def judge_reported(
    claim: Claim, d: dict[str, Any] | None, pair: tuple[str, str], n_docs: int | None, n_seeds: int = 1
) -> Verdict:
    """A contrast computed where its per-item numbers live (compare/rl.py: pass@1 paired over prompts)."""
    if d is None:
        return not_run(claim)
    c = claim.contrast
    detail = f"held-out {c.metric}: {c.a.what} - {c.b.what}"
    evidence = [f"{detail}: {fmt_diff(d)} over {n_docs} prompts"]
    if claim.test != "superiority":
        evidence.append(f"{claim.test} margin {claim.margin:g}")
    if n_seeds == 1:
        evidence.append("one training seed per arm: unreplicated")
    return Verdict(
        claim,
        decide(claim.test, d["ci95"], claim.margin),
        float(d["value"]),
        (float(d["ci95"][0]), float(d["ci95"][1])),
        claim.margin,
        (pair,),
        n_seeds,
        n_docs,
        True,
        detail,
        tuple(evidence),
    )


def _reported(claim: Claim, results: dict[str, Any]) -> Verdict:
    r = results.get("rank1_vs_full")
    d = None if not r else {"value": r["delta_pass1"], "ci95": r["ci95"]}
    return judge_reported(claim, d, ("lora-r1", "full"), (results.get("base") or {}).get("n"))


def verdict(claim: Claim, results: dict[str, Any]) -> Verdict:
    """The claim judged on one comparison's results (results.json, or compare/rl.py's for the RL claim)."""
    shape = claim.contrast.shape
    if shape == "reported":
        return _reported(claim, results)
    arms, fm = _ok(results), results.get("forgetting_metric", "drift_kl")
    if shape == "lr_ratio":
        fitted = results.get("lr_ratio")  # the LR study's fitted optima; older results: the best grid LRs
        if fitted and fitted.get("estimate") is not None:
            return _fitted_lr_ratio(claim, fitted)
        return _lr_ratio(claim, arms)
    if shape == "interaction":
        return _interaction(claim, arms, fm)
    return _difference(claim, arms, fm)
