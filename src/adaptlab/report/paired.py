"""Each arm's per-document numbers for results.json, which paired differences between arms are drawn from.

Every arm of a comparison is scored on the same documents, so a difference between two arms (or any
contrast, e.g. how a gap changes between two data sizes) leaves each document out of every arm at once
(a jackknife t interval, evaluate.stats.contrast_ci), which removes the documents' own difficulty from
the interval. results.json keeps each arm's per-document numbers under "per_doc" (per_doc_of); the contrasts
themselves (columns, contrast, difference, sign_of) live in adaptlab.findings.paired, the deciding
layer, and are imported here for the report's own tables. Results written before per-document
numbers were kept fall back to the conservative rule there, and say so (FALLBACK_NOTE).

    python -c "from adaptlab.report.paired import difference; help(difference)"
"""

from __future__ import annotations

from typing import Any

from adaptlab.findings.paired import (  # noqa: F401  (the report's tables read them from here)
    columns,
    contrast,
    difference,
    figure,
    fmt_diff,
    resolve,
    sign_of,
)

FALLBACK_NOTE = (
    "per-document numbers are missing for some arm (results written by an older adaptlab): its "
    "differences use the per-arm intervals, a conservative test"
)


def per_doc_of(evs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """An arm's per-document numbers, one row per seed, from its runs' evaluations (None: not kept)."""
    out: dict[str, Any] = {}
    for section in ("target", "general"):
        if all("per_doc" in e.get(section, {}) for e in evs) and section in evs[0]:
            p0 = evs[0][section]["per_doc"]
            out[section] = {
                "tokens": p0["tokens"],
                "base_nll": p0.get("base_nll"),
                "nll": [e[section]["per_doc"]["nll"] for e in evs],
            }
    for section in ("drift", "target_kl"):
        if section in evs[0] and all("per_doc" in e.get(section, {}) for e in evs):
            keys = [k for k in ("kl", "kl_reverse", "tokens") if k in evs[0][section]["per_doc"]]
            out[section] = {k: [e[section]["per_doc"][k] for e in evs] for k in keys}
    mc = {}
    for stem in evs[0].get("mc") or {}:
        if all("per_item" in (e.get("mc") or {}).get(stem, {}) for e in evs):
            mc[stem] = {
                "base_acc": evs[0]["mc"][stem]["per_item"].get("base_acc"),
                "acc": [e["mc"][stem]["per_item"]["acc"] for e in evs],
            }
    if mc:
        out["mc"] = mc
    return out or None
