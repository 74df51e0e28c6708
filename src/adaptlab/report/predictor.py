"""Does the KL between tuned and base on the target text predict forgetting? (RL's Razor)

Shenfeld et al. 2025 ("RL's Razor", arXiv 2509.04259) found forgetting tracks the KL between the
tuned and the base model measured on the new task's own data. Each arm of a comparison has both
numbers measured, so the report states the Spearman rank correlation across arms between each KL
direction on the held-out target text and the measured forgetting. Its 95% interval resamples the
documents (target and general independently) and recomputes every arm's two figures, so it shows
measurement noise; with few arms a rank correlation is coarse, and below MIN_ARMS it says so
instead of giving a number.

    python -c "from adaptlab.report.predictor import kl_predictor; help(kl_predictor)"
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adaptlab.evaluate.stats import N_RESAMPLES, SEED, interval95, spearman
from adaptlab.report.paired import columns, resolve

MIN_ARMS = 4
DIRECTIONS = {"base_tuned": ("kl", "KL(base || tuned)"), "tuned_base": ("kl_reverse", "KL(tuned || base)")}


def _ratio(num: np.ndarray, den: np.ndarray, idx: np.ndarray | None) -> float:
    """Mean over seeds of sum(num)/sum(den) over the documents idx (all when None)."""
    if idx is not None:
        num, den = num[:, idx], den[:, idx]
    return float(np.mean(num.sum(axis=1) / den.sum(axis=1)))


def _figures(cols: list[tuple[float, np.ndarray, np.ndarray]], idx: np.ndarray | None) -> np.ndarray:
    """Each arm's figure (up to the base's shared term) on the documents idx."""
    return np.array([sign * _ratio(num, den, idx) for sign, num, den in cols])


def kl_predictor(
    arms: list[dict[str, Any]], forgetting_metric: str, n_resamples: int = N_RESAMPLES
) -> dict[str, Any]:
    """Spearman correlation across measured arms of each target-text KL with forgetting, with intervals."""
    usable = []
    for a in arms:
        kl = (a.get("per_doc") or {}).get("target_kl")
        forget = columns(a, resolve("forgetting", forgetting_metric, a))
        if a.get("status") == "ok" and kl and forget is not None:
            usable.append((a, kl, forget))
    out: dict[str, Any] = {"arms": [a["name"] for a, _, _ in usable], "min_arms": MIN_ARMS}
    if not usable and any(a.get("status") == "ok" for a in arms):
        out["verdict"] = "not measured: no arm has the target KL (eval.target_kl was off)"
        return out
    if len(usable) < MIN_ARMS:
        out["verdict"] = (
            f"cannot tell: {len(usable)} measured arm{'s' if len(usable) != 1 else ''} with both figures, "
            f"a rank correlation needs at least {MIN_ARMS}"
        )
        return out
    forget_cols = [f for _, _, f in usable]
    n_forget = forget_cols[0][1].shape[1]
    rng = np.random.default_rng(SEED)
    for key, (field, label) in DIRECTIONS.items():
        if any(field not in kl for _, kl, _ in usable):
            continue
        kl_cols = [
            (1.0, np.asarray(kl[field], float), np.asarray(kl["tokens"], float)) for _, kl, _ in usable
        ]
        n_target = kl_cols[0][1].shape[1]
        draws = [
            spearman(
                _figures(kl_cols, rng.integers(0, n_target, n_target)),
                _figures(forget_cols, rng.integers(0, n_forget, n_forget)),
            )
            for _ in range(n_resamples)
        ]
        out[key] = {
            "label": label,
            "spearman": spearman(_figures(kl_cols, None), _figures(forget_cols, None)),
            "ci95": interval95(np.array(draws)),
            "kl": _figures(kl_cols, None).tolist(),
        }
    out["forgetting"] = _figures(forget_cols, None).tolist()
    out["verdict"] = _verdict(out)
    return out


def _verdict(p: dict[str, Any]) -> str:
    parts = []
    for key in DIRECTIONS:
        if key not in p:
            continue
        r = p[key]
        lo, hi = r["ci95"]
        word = (
            "predicts the ranking" if lo > 0.5 else "does not track" if hi < 0.5 else "is inconclusive about"
        )
        parts.append(f"{r['label']} {word} forgetting (Spearman {r['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}])")
    return "; ".join(parts) + f" across {len(p['arms'])} arms"
