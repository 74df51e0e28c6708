"""Published claims about LoRA and full fine-tuning, and the one function that judges them.

claims.py declares each claim once (its contrast, test, margin and metric); pairs.py says which arms
may be paired (matched on every factor but the one under test); paired.py computes contrasts paired
over the same held-out documents and seeds; verdict.py turns a contrast's interval into agrees /
disagrees / cannot tell / not run. report/, reproduce/, compare/rl.py and plan/ read verdicts from
here, so the same results give the same verdict everywhere.

    python -c "from adaptlab.findings import CLAIMS; print([c.id for c in CLAIMS])"
"""

from adaptlab.findings.claims import CLAIMS, REPORT_CLAIMS, Claim, Contrast, Side
from adaptlab.findings.pairs import matched_pairs
from adaptlab.findings.verdict import Verdict, decide, judge_reported, verdict

__all__ = [
    "CLAIMS",
    "REPORT_CLAIMS",
    "Claim",
    "Contrast",
    "Side",
    "Verdict",
    "decide",
    "judge_reported",
    "matched_pairs",
    "verdict",
]
