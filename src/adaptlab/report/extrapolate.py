"""Budget extrapolation: each arm family's learning and forgetting against tokens seen, as a power law.

A family is the arms that differ only in budget (tokens, or a data-size fraction). Its figures at
each budget are fitted as y = a * tokens^b by least squares in log-log space; the uncertainty comes
from a bootstrap over the held-out documents (one draw of documents shared by every arm and budget,
so differences between families are paired), each resample refitted. At a target budget the
report states every family's expected learning and forgetting and each family's difference from
the reference (full fine-tuning when present, else the family expected to learn most), each with
its 95% interval, and flags a target far beyond the largest budget measured (FAR_FACTOR).

The intervals are those of the fit given the measured points; they do not include the error of the
power-law form itself. With three or more budgets the report checks it: the fit without the largest
budget predicts that budget, and the report says whether the measurement fell within the interval.

    python -c "from adaptlab.report.extrapolate import extrapolate; help(extrapolate)"
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptlab.evaluate.stats import N_RESAMPLES, SEED, interval95

FAR_FACTOR = 4.0
"""A target more than this many times the largest measured budget is flagged as far beyond the data."""
_FAMILY_KEYS = ("method", "rank", "alpha", "rslora", "targets", "lr", "batch", "grad_accum", "seq_len")


def family_key(arm: dict[str, Any]) -> str:
    """What an arm is apart from its budget: method, adapter shape, LR and batch."""
    c = arm["config"]
    parts = [arm["method"]] + [f"{k}={c.get(k)}" for k in _FAMILY_KEYS[1:] if c.get(k) is not None]
    return " ".join(parts)


def _family_name(arms: list[dict[str, Any]]) -> str:
    """The shortest common prefix of its arms' names (e.g. full-1pct, full-10pct -> full)."""
    names = [a["name"] for a in arms]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix.rstrip("-_.") or names[0]


def _learning_docs(arm: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(gain (S, N), tokens (S, N)): base NLL - tuned NLL summed per document, per seed."""
    t = (arm.get("per_doc") or {}).get("target")
    if not t or t.get("base_nll") is None:
        return None
    nll = np.asarray(t["nll"], float)
    return np.asarray(t["base_nll"], float)[None, :] - nll, np.broadcast_to(
        np.asarray(t["tokens"], float), nll.shape
    )


def _forgetting_docs(arm: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    p = arm.get("per_doc") or {}
    if metric == "general_nll" and p.get("general") and p["general"].get("base_nll") is not None:
        g = p["general"]
        nll = np.asarray(g["nll"], float)
        return nll - np.asarray(g["base_nll"], float)[None, :], np.broadcast_to(
            np.asarray(g["tokens"], float), nll.shape
        )
    if metric == "drift_kl" and p.get("drift"):
        return np.asarray(p["drift"]["kl"], float), np.asarray(p["drift"]["tokens"], float)
    if metric == "mc_acc_drop" and p.get("mc"):
        m = next(iter(p["mc"].values()))
        if m.get("base_acc") is None:
            return None
        acc = np.asarray(m["acc"], float)
        return np.asarray(m["base_acc"], float)[None, :] - acc, np.ones_like(acc)
    return None


def _figure(cols: tuple[np.ndarray, np.ndarray], idx: np.ndarray | None) -> float:
    num, den = cols
    if idx is not None:
        num, den = num[:, idx], den[:, idx]
    return float(np.mean(num.sum(axis=1) / den.sum(axis=1)))


def fit_power_law(tokens: np.ndarray, values: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of values = a * tokens^b by least squares in log-log space; None unless every value is > 0."""
    if len(tokens) < 2 or np.any(values <= 0) or len(set(tokens.tolist())) < 2:
        return None
    b, log_a = np.polyfit(np.log(tokens), np.log(values), 1)
    return float(np.exp(log_a)), float(b)


def _predict(fit: tuple[float, float] | None, target: float) -> float:
    return float("nan") if fit is None else fit[0] * target ** fit[1]


def _families(arms: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for a in arms:
        if a.get("status") == "ok":
            groups.setdefault(family_key(a), []).append(a)
    return {k: sorted(v, key=lambda a: a["cost"]["tokens_seen"]) for k, v in groups.items()}


def extrapolate(
    arms: list[dict[str, Any]],
    forgetting_metric: str,
    target_tokens: int | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any] | None:
    """Per family of arms measured at two or more budgets: the power-law fits and, at target_tokens
    (default: the largest budget measured), the expected figures and differences with 95% intervals.
    None when no family was measured at two budgets."""
    fams = {k: v for k, v in _families(arms).items() if len({a["cost"]["tokens_seen"] for a in v}) >= 2}
    if not fams:
        return None
    largest = max(a["cost"]["tokens_seen"] for v in fams.values() for a in v)
    target = float(target_tokens or largest)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"target_tokens": int(target), "largest_budget": largest, "families": []}
    draws: dict[str, dict[str, np.ndarray]] = {}
    doc_draws: dict[str, np.ndarray] = {}  # one draw of documents per figure, shared by every family
    for key, members in fams.items():
        name = _family_name(members)
        fam: dict[str, Any] = {"name": name, "key": key, "arms": [a["name"] for a in members]}
        draws[name] = {}
        for what, get in (
            ("learning", _learning_docs),
            ("forgetting", lambda a: _forgetting_docs(a, forgetting_metric)),
        ):
            cols = [get(a) for a in members]
            tokens = np.array([a["cost"]["tokens_seen"] for a in members], float)
            if any(c is None for c in cols):
                fam[what] = {"note": "needs per-document numbers (results from an older adaptlab)"}
                continue
            values = np.array([_figure(c, None) for c in cols])
            fit = fit_power_law(tokens, values)
            entry: dict[str, Any] = {"tokens": tokens.tolist(), "values": values.tolist()}
            if fit is None:
                entry["note"] = f"no power-law fit: {what} is not positive at every budget"
                fam[what] = entry
                continue
            n = cols[0][0].shape[1]
            if what not in doc_draws:
                doc_draws[what] = rng.integers(0, n, size=(n_resamples, n))
            d = _bootstrap(tokens, cols, target, doc_draws[what])
            draws[name][what] = d
            entry.update(a=fit[0], b=fit[1], expected=_predict(fit, target), ci95=interval95(d))
            entry["failed_resamples"] = int(np.sum(~np.isfinite(d)))
            if len(tokens) >= 3:
                entry["holdout"] = _holdout(tokens, cols, doc_draws[what])
            fam[what] = entry
        out["families"].append(fam)
    factor = target / largest
    out["factor"] = factor
    out["far"] = factor > FAR_FACTOR
    out["differences"] = _differences(out["families"], draws)
    out["summary"] = _summary(out)
    return out


def _bootstrap(tokens: np.ndarray, cols: list[Any], target: float, doc_draws: np.ndarray) -> np.ndarray:
    """The power law's prediction at target, refitted on each resample of the documents."""
    out = np.empty(len(doc_draws))
    for r, idx in enumerate(doc_draws):
        out[r] = _predict(fit_power_law(tokens, np.array([_figure(c, idx) for c in cols])), target)
    return out


def _holdout(tokens: np.ndarray, cols: list[Any], doc_draws: np.ndarray) -> dict[str, Any]:
    """The check the data allow: fitted without the largest budget, is that budget's figure predicted?"""
    fit = fit_power_law(tokens[:-1], np.array([_figure(c, None) for c in cols[:-1]]))
    lo, hi = interval95(_bootstrap(tokens[:-1], cols[:-1], tokens[-1], doc_draws))
    measured = _figure(cols[-1], None)
    return {
        "tokens": int(tokens[-1]),
        "predicted": _predict(fit, tokens[-1]),
        "ci95": [lo, hi],
        "measured": measured,
        "within": bool(lo <= measured <= hi),
    }


def _differences(
    families: list[dict[str, Any]], draws: dict[str, dict[str, np.ndarray]]
) -> list[dict[str, Any]]:
    """Each family minus the reference (full when present, else the one expected to learn most)."""
    fitted = [f for f in families if "expected" in f.get("learning", {})]
    if len(fitted) < 2:
        return []
    full = [f for f in fitted if f["key"].split()[0] == "full"]
    ref = full[0] if full else max(fitted, key=lambda f: f["learning"]["expected"])
    rows = []
    for f in fitted:
        if f is ref:
            continue
        row: dict[str, Any] = {"family": f["name"], "reference": ref["name"]}
        for what in ("learning", "forgetting"):
            if what in draws[f["name"]] and what in draws[ref["name"]]:
                d = draws[f["name"]][what] - draws[ref["name"]][what]
                row[what] = {"value": f[what]["expected"] - ref[what]["expected"], "ci95": interval95(d)}
        rows.append(row)
    return rows


def _summary(out: dict[str, Any]) -> list[str]:
    n = out["target_tokens"]
    lines = []
    for d in out["differences"]:
        parts = []
        for what, verb in (("learning", "learn"), ("forgetting", "forget")):
            if what in d:
                v, (lo, hi) = d[what]["value"], d[what]["ci95"]
                word, (lo, hi) = ("more", (lo, hi)) if v > 0 else ("less", (-hi, -lo))
                tell = "" if lo > 0 else ", not distinguishable from no difference"
                parts.append(f"{verb} {word} by {abs(v):.4f} [{lo:.4f}, {hi:.4f}] nats/token{tell}")
        if parts:
            lines.append(
                f"At {n:,} tokens, against {d['reference']}, {d['family']} is expected to "
                + "; and to ".join(parts)
                + "."
            )
    for f in out["families"]:
        h = f.get("learning", {}).get("holdout")
        if h:
            lo, hi = h["ci95"]
            lines.append(
                f"Check on {f['name']}: fitted without its largest budget, learning at {h['tokens']:,} tokens was "
                f"predicted {h['predicted']:.4f} [{lo:.4f}, {hi:.4f}] and measured {h['measured']:.4f}: "
                + (
                    "within the interval."
                    if h["within"]
                    else "outside it, so the power law does not hold here."
                )
            )
    if out["far"]:
        lines.append(
            f"This extrapolates {out['factor']:.0f}x beyond the largest budget measured ({out['largest_budget']:,} "
            "tokens): far outside the data, the power-law form itself is untested."
        )
    return lines
