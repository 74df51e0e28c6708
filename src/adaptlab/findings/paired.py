"""Contrasts between arms, paired over the same held-out documents (and seeds), with 95% intervals.

Every arm of a comparison is scored on the same documents, so a difference between two arms (or
any contrast, e.g. how a gap changes between two data sizes) is bootstrapped by drawing the same
documents for every arm in each resample (evaluate.stats.contrast_ci). That removes the documents'
own difficulty from the interval, which per-arm intervals keep. Arms without per-document numbers
(results written before they were kept, or figures measured on other documents: own_learning)
fall back to the conservative rule: an interval from the per-arm intervals' ends, distinguishable
exactly when those intervals do not overlap; the result says `"paired": False`.

    python -c "from adaptlab.findings.paired import difference; help(difference)"
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from adaptlab.evaluate.stats import contrast_ci


def columns(arm: dict[str, Any], metric: str) -> tuple[float, np.ndarray, np.ndarray] | None:
    """(sign, num (S, N), den (S, N)) whose ratio of sums times sign is the arm's figure up to a
    term shared by every arm (the base's figure on the same documents)."""
    p = arm.get("per_doc") or {}
    if metric in ("learning", "general_nll"):
        sec = p.get("target" if metric == "learning" else "general")
        if not sec:
            return None
        num = np.asarray(sec["nll"], float)
        return (
            (-1.0 if metric == "learning" else 1.0),
            num,
            np.broadcast_to(np.asarray(sec["tokens"], float), num.shape),
        )
    if metric == "drift_kl" and p.get("drift"):
        return 1.0, np.asarray(p["drift"]["kl"], float), np.asarray(p["drift"]["tokens"], float)
    if metric.startswith("mc:") and metric[3:] in (p.get("mc") or {}):
        acc = np.asarray(p["mc"][metric[3:]]["acc"], float)
        return -1.0, acc, np.ones_like(acc)
    return None


def figure(arm: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """The arm's own figure {value, ci95} of a metric: learning, own_learning, forgetting, general_nll,
    drift_kl, mc:<stem>, intruders_per_layer (a count from one run's weights: a point, no interval)."""
    f = arm.get("forgetting") or {}
    if metric in ("learning", "own_learning"):
        return arm.get(metric)
    if metric == "intruders_per_layer":
        x = (arm.get("analysis") or {}).get("intruders_per_layer")
        return None if x is None else {"value": x, "ci95": [x, x]}
    if metric == "forgetting":
        return f if f.get("value") is not None else None
    if metric == "general_nll":
        return f.get("general_nll")
    if metric == "drift_kl":
        return f.get("drift")
    if metric.startswith("mc:"):
        return (f.get("mc") or {}).get(metric[3:])
    return None


def resolve(metric: str, forgetting_metric: str, arm: dict[str, Any]) -> str:
    """The concrete metric behind "forgetting" (the comparison's forgetting measure)."""
    if metric != "forgetting":
        return metric
    if forgetting_metric == "mc_acc_drop":
        stems = list((arm.get("forgetting") or {}).get("mc") or {})
        return f"mc:{stems[0]}" if stems else "forgetting"
    return forgetting_metric


def contrast(
    terms: list[tuple[float, dict[str, Any]]], metric: str, forgetting_metric: str = "drift_kl"
) -> dict[str, Any] | None:
    """sum_i w_i * figure(arm_i) with its 95% interval: paired when every arm kept per-document numbers."""
    concrete = resolve(metric, forgetting_metric, terms[0][1])
    cols = [columns(a, concrete) for _, a in terms]
    if all(c is not None for c in cols):
        shapes = {c[1].shape[1] for c in cols if c is not None}
        if len(shapes) == 1:
            out = contrast_ci([(w * c[0], c[1], c[2]) for (w, _), c in zip(terms, cols, strict=True) if c])
            return {"value": out["value"], "ci95": out["ci95"], "paired": True}
    figs = [figure(a, metric) for _, a in terms]
    if any(f is None or f.get("value") is None for f in figs):
        return None
    value = sum(w * f["value"] for (w, _), f in zip(terms, figs, strict=True) if f)
    # conservative: the widest the contrast can be given each arm's own interval
    lo = sum(w * f["ci95"][0 if w > 0 else 1] for (w, _), f in zip(terms, figs, strict=True) if f)
    hi = sum(w * f["ci95"][1 if w > 0 else 0] for (w, _), f in zip(terms, figs, strict=True) if f)
    return {"value": value, "ci95": [lo, hi], "paired": False}


def difference(
    a: dict[str, Any], b: dict[str, Any], metric: str, forgetting_metric: str = "drift_kl"
) -> dict[str, Any] | None:
    """figure(a) - figure(b) with its paired 95% interval (None: a figure is missing)."""
    return contrast([(1.0, a), (-1.0, b)], metric, forgetting_metric)


def sign_of(d: dict[str, Any] | None) -> str:
    """above (interval above 0), below, or overlap (contains 0, or no figure)."""
    if d is None or any(math.isnan(x) for x in d["ci95"]):
        return "overlap"
    if d["ci95"][0] > 0:
        return "above"
    if d["ci95"][1] < 0:
        return "below"
    return "overlap"


def fmt_diff(d: dict[str, Any] | None, digits: int = 4) -> str:
    if d is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{d['value']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
