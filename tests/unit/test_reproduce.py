"""`adaptlab reproduce` end to end on tiny-random at a few steps per arm: every study's comparison runs
(arm list, results.json fields), every finding gets a verdict row, findings.md is written, and a second
invocation reuses what is finished.

    python -m pytest -q tests/unit/test_reproduce.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adaptlab import reproduce as rep
from adaptlab.compare.inline import InlineExecutor

TINY = rep.Scale(
    tokens=64,
    batch=2,
    seq_len=32,
    eval_docs=2,
    eval_chars=300,
    eval_seq_len=64,
    rl_steps=1,
    rl_eval_prompts=4,
)
EXPECTED_ARMS = {
    "methods": {"full", "lora", "lora-attn", "rslora", "dora"},
    "lr": {"full", "lora"},
    "targets": {"lora-all", "lora-attn", "lora-mlp"},
    "batch": {f"{m}-{b}" for m in ("full", "lora") for b in ("small", "default", "large")},
    "rank": {"full", "lora-r1"},
    "data-size": {"full-1pct", "full-10pct", "full-100pct"},
    "regime": {f"{r}-{m}-{b}" for r in ("cpt", "ift") for m in ("full", "lora") for b in ("small", "large")},
    "continual": {"full-a", "lora-a", "full-a-then-b", "lora-a-then-b", "lora-b"},
    "healed": {"full", "lora"},
    "rl": {"lora-r1", "lora-r4", "lora-r16", "full"},
}


def _head(src: Path, dst: Path, n: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open() as fh:
        lines = [json.loads(next(fh)) for _ in range(n)]
    for rec in lines:
        for key in ("text", "response"):
            if key in rec:
                rec[key] = rec[key][:1500]
    dst.write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """The shipped layout, cut to a few records per file."""
    root = tmp_path_factory.mktemp("shared")
    for rel in (*rep.DOMAINS.values(), rep.REGIME_PAIRS):
        _head(shared_data / rel, root / rel, 24)
    # glosses are one line each: the regime study's raw text needs enough of them for a validation block
    _head(shared_data / rep.GENERAL, root / rep.GENERAL, 400)
    return root


@pytest.fixture(scope="module")
def reproduced(
    root: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[Any], dict[str, Any], Path]:
    """Every study: the per-domain ones on one domain, continual across the two."""
    out = tmp_path_factory.mktemp("repro")
    comparisons = [
        c
        for c in rep.plan(root, model="tiny-random", scale=TINY)
        if c.domain != "systems"  # one domain is enough here; continual uses both
    ]
    data = rep.run(comparisons, out, executor=InlineExecutor())
    return comparisons, data, out


def test_every_study_runs_with_its_arms_and_results_fields(reproduced: Any) -> None:
    comparisons, _, out = reproduced
    assert {c.study for c in comparisons} == set(rep.STUDIES)
    for c in comparisons:
        results = json.loads((out / c.key / "results.json").read_text())
        if c.study == "rl":  # compare/rl.py's own results: pass@1 per arm and the rank-1 verdict
            assert {a["arm"] for a in results["arms"]} == EXPECTED_ARMS["rl"]
            assert results["rank1_vs_full"]["ci95"] and results["study"]["model"] == "tiny-random"
            continue
        names = {a["name"] for a in results["arms"]}
        assert EXPECTED_ARMS[c.study] <= names, c.key
        assert all(a["status"] == "ok" for a in results["arms"]), [
            (c.key, a.get("error")) for a in results["arms"]
        ]
        for a in results["arms"]:
            assert {"learning", "forgetting", "cost", "config"} <= set(a), c.key
        if c.study in ("regime", "continual"):
            assert results[c.study]["rows"]
    healed = next(c for c in comparisons if c.study == "healed")
    assert healed.spec["model"] == "tiny-random-healed"


def test_a_verdict_row_per_finding_and_findings_md(reproduced: Any, tmp_path: Path) -> None:
    comparisons, data, out = reproduced
    by_id = {f["id"]: f for f in data["findings"]}
    assert set(by_id) == {f.id for f in rep.FINDINGS}
    verdicts = {"agrees", "disagrees", "cannot tell", "not run", "mixed"}
    for f in data["findings"]:
        assert f["overall"] in verdicts
        assert f["rows"], f["id"]
        for row in f["rows"]:
            assert row["verdict"] in verdicts - {"mixed"}
            if row["verdict"] in ("agrees", "disagrees", "cannot tell") and row["ci95"] is not None:
                lo, hi = row["ci95"]
                assert lo <= row["value"] <= hi
    for fid in ("learns_less", "forgets_less", "targets", "regime", "continual", "rank", "rank1_rl"):
        assert by_id[fid]["rows"][0]["verdict"] != "not run", fid
    md = rep.write_findings(data, tmp_path / "findings.md").read_text()
    assert f"Comparisons judged ({len(comparisons)})" in md and "Not run yet" not in md
    nothing = rep.run(comparisons, tmp_path / "empty", judge_only=True)
    assert all(f["overall"] == "not run" for f in nothing["findings"])
    assert (
        f"Not run yet ({len(comparisons)})" in rep.write_findings(nothing, tmp_path / "none.md").read_text()
    )
    for f in rep.FINDINGS:
        assert f"`{f.id}`" in md
    assert json.loads((out / "findings.json").read_text()) == data


def test_second_run_reuses_finished_comparisons(reproduced: Any) -> None:
    comparisons, data, out = reproduced
    events: list[dict[str, Any]] = []
    again = rep.run(comparisons, out, on_event=events.append, executor=InlineExecutor())
    assert not [e for e in events if e["event"] == "train_start"]
    assert {"event": "message", "text": "arithmetic/rl: finished earlier, reused"} in events
    assert again["findings"] == data["findings"]


def test_plan_and_estimate(root: Path, run_cli: Any) -> None:
    comparisons = rep.plan(root, model="tiny-random")
    keys = [c.key for c in comparisons]
    assert (
        "legal/methods" in keys
        and "systems/healed-methods" in keys
        and "legal-then-systems/continual" in keys
        and "arithmetic/rl" in keys
    )
    assert rep.estimate_s(comparisons) > 0
    code, out, _ = run_cli(
        "reproduce", "--data-root", root, "--out", "unused", "--dry-run", "--model", "tiny-random"
    )
    assert code == 0 and "estimated" in out and "wordnet/regime" in out
    code, _, err = run_cli("reproduce", "--data-root", root / "nope", "--out", "unused", "--dry-run")
    assert code == 2 and "missing" in err
    code, _, err = run_cli(
        "reproduce", "--data-root", root, "--out", "unused", "--dry-run", "--domains", "nosuch"
    )
    assert code == 2 and "--domains nosuch: unknown" in err


def test_findings_never_replace_a_users_file(root: Path, run_cli: Any, tmp_path: Path) -> None:
    mine = tmp_path / "findings.md"
    mine.write_text("my own notes\n")
    code, _, err = run_cli(
        "reproduce", "--data-root", root, "--out", tmp_path / "o", "--judge-only", "--findings", mine
    )
    assert code == 2 and "not written by adaptlab" in err and len(err.strip().splitlines()) == 1
    assert mine.read_text() == "my own notes\n" and not (tmp_path / "o").exists()
    rep.write_findings({"findings": []}, mine)  # one adaptlab wrote may be written again
    rep.check_findings_path(mine)
