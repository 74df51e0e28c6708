"""The findings a reproduction judges: each published claim (findings/claims.py) with the studies whose
results test it, judged by findings.verdict in every comparison that ran, and overall.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaptlab.findings import Claim, claims, verdict
from adaptlab.reproduce.planning import Comparison


@dataclass(frozen=True)
class Finding:
    """A published claim (findings/claims.py) and the studies of the reproduction whose results test it."""

    claim: Claim
    study: str  # which comparison's results it reads
    also: tuple[str, ...] = ()  # other studies whose results hold the arms it compares

    @property
    def id(self) -> str:
        return self.claim.id


FINDINGS = [
    Finding(claims.LEARNS_LESS, "methods"),
    Finding(claims.FORGETS_LESS, "methods"),
    Finding(claims.FORGETS_LESS_HEALED, "healed"),
    Finding(claims.LR_RATIO, "lr"),
    Finding(claims.TARGETS, "targets", also=("methods",)),
    Finding(claims.BATCH, "batch"),
    Finding(claims.RANK, "rank"),
    Finding(claims.DATA_SIZE, "data-size"),
    Finding(claims.INTRUDERS, "methods"),
    Finding(claims.QLORA, "methods"),
    Finding(claims.REGIME, "regime"),
    Finding(claims.CONTINUAL, "continual"),
    Finding(claims.RANK1_RL, "rl"),
]
ROW_KEYS = (
    "verdict",
    "verdict_text",
    "value",
    "ci95",
    "margin",
    "pairs",
    "n_seeds",
    "n_docs",
    "unreplicated",
    "detail",
)


def _overall(verdicts: set[str]) -> str:
    """Across comparisons: the one verdict they share, "mixed" when they differ (not-run rows aside)."""
    ran = verdicts - {"not run"}
    if not ran:
        return "not run"
    return next(iter(ran)) if len(ran) == 1 else "mixed"


def judge(comparisons: list[Comparison], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per finding: findings.verdict in each comparison that tests it, and overall."""
    out = []
    for f in FINDINGS:
        rows = []
        for c in comparisons:
            if (c.study == f.study or c.study in f.also) and c.key in results:
                v = verdict(f.claim, results[c.key]).to_dict()
                rows.append({"comparison": c.key, "domain": c.domain, **{k: v[k] for k in ROW_KEYS}})
        out.append(
            {
                "id": f.id,
                "claim": f.claim.claim,
                "source": f.claim.source,
                "study": f.study,
                "test": f.claim.test,
                "overall": _overall({r["verdict"] for r in rows}),
                "rows": rows,
                "note": f"needs {f.claim.contrast.needs}",
            }
        )
    return out
