"""docs/findings.md from findings.json: each finding's verdict per comparison, with numbers and CIs,
and which comparisons the verdicts rest on; a --findings file adaptlab did not write is refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from adaptlab.errors import UserError


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"


def _coverage(comparisons: list[dict[str, Any]]) -> list[str]:
    """Which of the reproduction's comparisons these verdicts rest on, and which have not run."""
    done = [c["key"] for c in comparisons if c.get("finished", True)]
    missing = [c["key"] for c in comparisons if not c.get("finished", True)]
    if not comparisons:
        return []
    models = sorted({c["model"] for c in comparisons if c.get("model")})
    budgets = sorted({c["tokens"] for c in comparisons if c.get("tokens")})
    lines = (
        [
            f"Models: {', '.join(models)}; training budget per arm: "
            + (", ".join(f"{t:,}" for t in budgets) or "-")
            + " tokens (the rl study counts episodes)."
        ]
        if models
        else []
    )
    lines.append(f"Comparisons judged ({len(done)}): " + (", ".join(f"`{k}`" for k in done) or "none") + ".")

    if missing:
        lines.append(f"Not run yet ({len(missing)}): " + ", ".join(f"`{k}`" for k in missing) + ".")
    measured = [f"- {_measured_line(c)}" for c in comparisons if c.get("finished", True) and "seeds" in c]
    return [" ".join(lines), "", *([*measured, ""] if measured else [])]


def _measured_line(c: dict[str, Any]) -> str:
    seeds = c["seeds"]
    lrs = ", ".join(
        f"{arm} {lr:g}" + (f" ({source})" if source else "")
        for arm, (lr, source) in sorted(c.get("lrs", {}).items())
        if isinstance(lr, (int, float))
    )
    return (
        f"`{c['key']}`: {seeds} seed{'s' if seeds != 1 else ' (unreplicated)'}, "
        f"{c.get('held_out') or '?'} held-out documents or prompts" + (f"; LRs: {lrs}" if lrs else "") + "."
    )


FINDINGS_TITLE = "# Findings: what adaptlab measured of the published claims"


def check_findings_path(path: str | Path) -> None:
    """Refuse a --findings file that exists and was not written by adaptlab (it would be replaced)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--findings {p} is a directory: give a Markdown file name")
    if not p.exists():
        return
    try:
        first = p.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    except OSError as err:
        raise UserError(f"--findings {p}: cannot read ({err.strerror})") from None
    if first.strip() != FINDINGS_TITLE:
        raise UserError(
            f"--findings {p} exists and was not written by adaptlab: move it or choose another --findings"
        )


def write_findings(data: dict[str, Any], path: str | Path, header: str = "") -> Path:
    """docs/findings.md from findings.json: each finding, its verdict per comparison, with numbers and CIs."""
    lines = [
        FINDINGS_TITLE,
        "",
        header
        or "Written by `adaptlab reproduce` from the evidence it keeps in docs/findings/ (each comparison's "
        "results.json and settings); `adaptlab reproduce --data-root ../shared/data --out DIR --judge-only` "
        "writes this file again from that evidence, byte for byte. Each claim's contrast is pooled over arms "
        "matched on every factor but the one under test, with its 95% interval paired over the same held-out "
        "documents and seeds. Superiority agrees / disagrees when the interval lies wholly on the claimed / "
        "the other side of zero; non-inferiority agrees when it stays above -margin; equivalence agrees only "
        "when it lies inside +-margin; anything else cannot tell. One seed is unreplicated.",
        "",
        *_coverage(data.get("comparisons", [])),
        "| finding | claim | overall | comparison | measured | 95% CI | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in data["findings"]:
        rows = f["rows"] or [
            {"comparison": "-", "value": None, "ci95": None, "verdict": "not run", "detail": f["note"]}
        ]
        for i, r in enumerate(rows):
            ci = "-" if not r.get("ci95") else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
            head = (f"`{f['id']}`", f["claim"], f"**{f['overall']}**") if i == 0 else ("", "", "")
            lines.append(
                f"| {' | '.join(head)} | {r['comparison']} | {_num(r.get('value'))}"
                + (f" ({r['detail']})" if r.get("detail") else "")
                + " "
                f"| {ci} | {r.get('verdict_text') or r['verdict']} |"
            )
    sources = sorted({s for f in data["findings"] for s in f["source"].split("; ")})
    lines += ["", "Sources: " + "; ".join(sources) + ".", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
