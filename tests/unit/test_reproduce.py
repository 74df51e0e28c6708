"""`adaptlab reproduce` end to end on tiny-random at a few steps per arm: every study's comparison runs
(arm list, results.json fields), every finding gets a verdict row, findings.md is written, and a second
invocation reuses what is finished.

    python -m pytest -q tests/unit/test_reproduce.py
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import undeclared_outputs

from adaptlab import reproduce as rep
from adaptlab.compare.inline import InlineExecutor
from adaptlab.outputs import WRITES, marker_kind

TINY = rep.Scale(
    tokens=64,
    seeds=1,
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
    data = rep.run(comparisons, out, executor=InlineExecutor(), evidence=_evidence_of(out))
    return comparisons, data, out


def _evidence_of(out: Path) -> Path:
    return out.parent / f"{out.name}-evidence"


def test_every_study_runs_with_its_arms_and_results_fields(reproduced: Any) -> None:
    comparisons, data, out = reproduced
    assert {c.study for c in comparisons} == set(rep.STUDIES)
    refused = {r["key"]: r.get("refused") for r in data["comparisons"]}
    for c in comparisons:
        if c.study == "data-size":  # a pool of one document at 64 tokens: every fraction the same
            assert "1%, 10% and 100% train on the same 1 document(s)" in refused[c.key]
            assert not (out / c.key / "results.json").exists()
            continue
        assert refused[c.key] is None, c.key
        results = json.loads((out / c.key / "results.json").read_text())
        assert results["seeds"] == 1, c.key  # what the verdicts read to call a finding unreplicated
        if c.study == "rl":  # compare/rl.py's own results: pass@1 per arm and the rank-1 verdict
            assert {a["arm"] for a in results["arms"]} == EXPECTED_ARMS["rl"]
            assert all(a["seeds"] == 1 for a in results["arms"])
            assert results["rank1_vs_full"]["ci95"] and results["study"]["model"] == "tiny-random"
            continue
        names = {a["name"] for a in results["arms"]}
        assert EXPECTED_ARMS[c.study] <= names, c.key
        assert all(a["status"] == "ok" for a in results["arms"]), [
            (c.key, a.get("error")) for a in results["arms"]
        ]
        for a in results["arms"]:
            assert {"learning", "forgetting", "cost", "config"} <= set(a), c.key
            assert a["seeds"] == 1, c.key
        if c.study in ("regime", "continual"):
            assert results[c.study]["rows"]
    healed = next(c for c in comparisons if c.study == "healed")
    assert healed.spec["model"] == "tiny-random-healed"
    assert marker_kind(out) == "reproduction" and undeclared_outputs(out, "reproduction") == []


def test_a_verdict_row_per_finding_and_findings_md(reproduced: Any, tmp_path: Path) -> None:
    comparisons, data, out = reproduced
    by_id = {f["id"]: f for f in data["findings"]}
    assert set(by_id) == {f.id for f in rep.FINDINGS}
    verdicts = {"agrees", "disagrees", "cannot tell", "not run", "mixed"}
    for f in data["findings"]:
        assert f["overall"] in verdicts
        if f["study"] == "data-size":  # refused at this budget: no comparison to judge
            assert f["overall"] == "not run" and not f["rows"]
            continue
        assert f["rows"], f["id"]
        for row in f["rows"]:
            assert row["verdict"] in verdicts - {"mixed"}
            if row["verdict"] in ("agrees", "disagrees", "cannot tell") and row["ci95"] is not None:
                lo, hi = row["ci95"]
                assert lo <= row["value"] <= hi
    for fid in ("learns_less", "forgets_less", "targets", "regime", "continual", "rank", "rank1_rl"):
        assert by_id[fid]["rows"][0]["verdict"] != "not run", fid
    md = rep.write_findings(data, tmp_path / "findings.md").read_text()
    assert f"Comparisons judged ({len(comparisons) - 1})" in md and "Not run yet (1): `legal/data-size`" in md
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


def test_kept_evidence_regenerates_findings_md_byte_for_byte_and_a_run_resumes_from_it(
    reproduced: Any, tmp_path: Path
) -> None:
    comparisons, data, out = reproduced
    evidence = _evidence_of(out)
    kept = sorted(str(p.parent.relative_to(evidence)) for p in evidence.rglob("results.json"))
    assert kept == sorted(r["key"] for r in data["comparisons"] if r["finished"])
    assert all((evidence / key / "spec.json").exists() for key in kept)
    written = rep.write_findings(data, tmp_path / "a.md").read_bytes()
    judged = rep.run(comparisons, tmp_path / "fresh", judge_only=True, evidence=evidence)
    assert rep.write_findings(judged, tmp_path / "b.md").read_bytes() == written
    assert "1 seed (unreplicated)" in written.decode() and "held-out documents" in written.decode()
    events: list[dict[str, Any]] = []
    rep.run(
        comparisons, tmp_path / "again", on_event=events.append, executor=InlineExecutor(), evidence=evidence
    )
    ran = [e["key"] for e in events if e["event"] == "comparison"]
    assert ran == [r["key"] for r in data["comparisons"] if not r["finished"]]  # only the refused one
    assert not [e for e in events if e["event"] == "train_start"]


def test_plan_and_estimate(root: Path, run_cli: Any) -> None:
    # the root holds 24 documents per domain: too few to hold out the default 64
    comparisons = rep.plan(root, model="tiny-random", scale=rep.Scale(eval_docs=4))
    keys = [c.key for c in comparisons]
    assert (
        "legal/methods" in keys
        and "systems/healed-methods" in keys
        and "legal-then-systems/continual" in keys
        and "arithmetic/rl" in keys
    )
    assert rep.estimate_s(comparisons) > 0
    code, out, _ = run_cli(
        "reproduce",
        "--data-root",
        root,
        "--out",
        "unused",
        "--dry-run",
        "--model",
        "tiny-random",
        "--eval-docs",
        "4",
    )
    assert code == 0 and "estimated" in out and "wordnet/regime" in out
    code, _, err = run_cli("reproduce", "--data-root", root, "--out", "unused", "--dry-run")
    assert code == 2 and "lower --eval-docs" in err and len(err.strip().splitlines()) == 1
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


def _judge_only(root: Path, out: Path, findings: Path) -> tuple[str, ...]:
    return (
        *("reproduce", "--data-root", str(root), "--out", str(out), "--judge-only"),
        *("--evidence", str(findings.parent / "evidence"), "--eval-docs", "4"),
        *(
            "--findings",
            str(findings),
            "--model",
            "tiny-random",
            "--studies",
            "methods",
            "--domains",
            "legal",
        ),
    )


def _line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_judge_only_never_replaces_a_users_findings_json(root: Path, run_cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "findings.json").write_text("my findings\n")
    args = _judge_only(root, out, tmp_path / "findings.md")
    code, _, err = run_cli(*args)
    assert code == 2 and "did not write" in _line(err) and "--overwrite" in _line(err)
    code, _, err = run_cli(*args, "--overwrite")  # beside the user's files, never over one
    assert code == 2 and "findings.json" in _line(err) and "write over" in _line(err)
    assert [p.name for p in out.iterdir()] == ["findings.json"]
    assert (out / "findings.json").read_text() == "my findings\n"
    assert not (tmp_path / "findings.md").exists()
    own = tmp_path / "own"  # a reproduction adaptlab wrote is judged again, its findings.json replaced
    for _ in range(2):
        code, _, err = run_cli(*_judge_only(root, own, tmp_path / "findings.md"))
        assert code == 0, err
        assert json.loads((own / "findings.json").read_text())["comparisons"][0]["key"] == "legal/methods"
    assert marker_kind(own) == "reproduction"


def test_reproduce_refuses_a_users_folder_as_compare_and_train_do(
    root: Path, run_cli: Any, tmp_path: Path
) -> None:
    out = tmp_path / "notes"
    out.mkdir()
    (out / "NOTES.txt").write_text("keep\n")
    code, _, err = run_cli(
        "reproduce", "--data-root", root, "--out", out, "--model", "tiny-random", "--studies", "rank",
        "--domains", "legal", "--tokens", "64", "--findings", tmp_path / "findings.md",
        "--evidence", tmp_path / "evidence", "--eval-docs", "4",
    )  # fmt: skip
    assert code == 2 and "did not write" in _line(err) and "--overwrite" in _line(err)
    assert [p.name for p in out.iterdir()] == ["NOTES.txt"]  # nothing trained, no marker left
    code, _, err = run_cli(*_judge_only(root, out, tmp_path / "findings.md"), "--overwrite")
    assert code == 0, err
    assert (out / "NOTES.txt").read_text() == "keep\n" and (out / "findings.json").exists()
    assert undeclared_outputs(out, "reproduction") == ["NOTES.txt"]


def test_every_folder_a_reproduction_writes_is_declared(root: Path) -> None:
    tops = {c.key.split("/")[0] for c in rep.plan(root, model="tiny-random", scale=rep.Scale(eval_docs=4))}
    assert [t for t in sorted(tops) if not any(fnmatch.fnmatch(t, w) for w in WRITES["reproduction"])] == []
