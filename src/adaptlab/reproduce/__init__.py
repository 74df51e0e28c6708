"""`adaptlab reproduce`: run the studies that test the published findings, and write docs/findings.md.

Each finding (FINDINGS) is a published claim (findings/claims.py: its contrast, test and margin) and
the studies whose results test it; findings.verdict judges it on each such comparison's results.json:
agrees / disagrees / cannot tell / not run, the same function the comparison's own report uses. The
studies run on the model (default smollm2-135m) with two target domains; the forgetting finding is
repeated on the healed base (healed.py), so "full fine-tuning forgets less" can be told from "full
fine-tuning repairs the quantized base". Every comparison lives in OUT/<domain>/<study>/ and is reused
when finished (compare() itself skips finished runs and cached evaluations), so an interrupted
reproduce resumes. OUT/findings.json holds every verdict with its numbers; write_findings() renders it
as Markdown.

    adaptlab reproduce --data-root ../shared/data --out repro            # ~ hours on 2 CPU cores
    adaptlab reproduce --data-root ../shared/data --out repro --dry-run  # the plan and its estimate

The package, one concern a module: planning.py (the data layout, Scale, `plan`, `estimate_s`),
running.py (`run`: run or reuse, then judge), judging.py (FINDINGS, `judge`), markdown.py
(`write_findings`). Callers use it as `from adaptlab import reproduce as rep`.
"""

from __future__ import annotations

from adaptlab.reproduce.judging import FINDINGS, ROW_KEYS, Finding, judge
from adaptlab.reproduce.markdown import FINDINGS_TITLE, check_findings_path, write_findings
from adaptlab.reproduce.planning import (
    DOMAINS,
    EVAL_SECONDS_DOCS,
    EVAL_SECONDS_PER_ARM,
    GENERAL,
    PER_DOMAIN,
    REGIME_PAIRS,
    RL_EVAL_SECONDS,
    RL_SECONDS_PER_STEP,
    RL_TASK,
    SECONDS_PER_TOKEN,
    STUDIES,
    Comparison,
    Scale,
    estimate_s,
    held_out_frac,
    plan,
)
from adaptlab.reproduce.running import EVIDENCE, run

__all__ = [
    "Comparison",
    "DOMAINS",
    "EVAL_SECONDS_DOCS",
    "EVAL_SECONDS_PER_ARM",
    "EVIDENCE",
    "FINDINGS",
    "FINDINGS_TITLE",
    "Finding",
    "GENERAL",
    "PER_DOMAIN",
    "REGIME_PAIRS",
    "RL_EVAL_SECONDS",
    "RL_SECONDS_PER_STEP",
    "RL_TASK",
    "ROW_KEYS",
    "SECONDS_PER_TOKEN",
    "STUDIES",
    "Scale",
    "check_findings_path",
    "estimate_s",
    "held_out_frac",
    "judge",
    "plan",
    "run",
    "write_findings",
]
