"""`compare --study regime` and `--study continual` end to end on tiny-random (a few steps each): the arm
list, the runs that start from other runs, results.json's study tables.

    python -m pytest -q tests/unit/test_studies_regime.py
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helpers import write_corpus

from adaptlab.compare import build_spec, compare
from adaptlab.compare.inline import InlineExecutor
from adaptlab.errors import UserError
from adaptlab.rundir import RunDir


def _head(src: Path, dst: Path, n: int) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open() as fh:
        dst.write_text("".join(next(fh) for _ in range(n)))
    return dst


def tiny_study(study: str, data: Path, second: Path, general: Path, tokens: int = 256) -> dict[str, Any]:
    return {
        "model": "tiny-random",
        "study": study,
        "data": {"train": [str(data)], "test_frac": 0.2},
        "study_data": [str(second)],
        "general": [str(general)],
        "drift": False,
        "tokens": tokens,
        "seeds": 1,
        "train": {"batch": 2, "seq_len": 32, "eval_points": 1, "eval_examples": 2, "checkpoints": 0},
        "eval": {"max_docs": 3, "max_chars": 400, "seq_len": 64},
        "analysis": {"enabled": False},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("studies")
    return {
        "a": write_corpus(root / "a", n_docs=20),
        "pairs": _head(shared_data / "instruct" / "wordnet_define.jsonl", root / "pairs.jsonl", 40),
        "b": _head(shared_data / "systems" / "man_pages.jsonl", root / "b.jsonl", 20),
        "general": _head(shared_data / "general" / "wordnet_glosses.jsonl", root / "general.jsonl", 5),
    }


def test_regime_trains_cpt_and_ift_for_full_and_lora_at_two_budgets(
    files: dict[str, Path], tmp_path: Path
) -> None:
    spec = build_spec(tiny_study("regime", files["a"], files["pairs"], files["general"]))
    results = compare(spec, tmp_path / "cmp", report=False, executor=InlineExecutor())
    names = [a["name"] for a in results["arms"]]
    assert sorted(names) == sorted(
        f"{r}-{m}-{b}" for r in ("cpt", "ift") for m in ("full", "lora") for b in ("small", "large")
    )
    assert all(a["status"] == "ok" for a in results["arms"]), [a.get("error") for a in results["arms"]]
    by = {a["name"]: a for a in results["arms"]}
    assert by["cpt-full-small"]["config"]["tokens"] < by["cpt-full-large"]["config"]["tokens"]
    assert by["ift-lora-large"]["config"]["data"] == [str(files["pairs"])]
    assert "own_learning" in by["ift-lora-large"] and "own_learning" not in by["cpt-lora-large"]
    rows = results["regime"]["rows"]
    assert {(r["regime"], r["budget"]) for r in rows} == {
        (x, y) for x in ("cpt", "ift") for y in ("small", "large")
    }
    for r in rows:
        assert r["full_minus_lora"]["value"] == pytest.approx(r["full"]["value"] - r["lora"]["value"])
    config_text = (tmp_path / "cmp" / "runs" / "ift-full-large" / "config.yaml").read_text()
    assert re.search(r"\bprompt\b", config_text) is None


def test_continual_runs_b_from_a_and_tables_what_each_method_kept(
    files: dict[str, Path], tmp_path: Path
) -> None:
    spec = build_spec(tiny_study("continual", files["a"], files["b"], files["general"]))
    out = tmp_path / "cmp"
    results = compare(spec, out, report=False, executor=InlineExecutor())
    by = {a["name"]: a for a in results["arms"]}
    assert set(by) == {"full-a", "lora-a", "full-a-then-b", "lora-a-then-b", "lora-b"}
    assert all(a["status"] == "ok" for a in by.values()), [a.get("error") for a in by.values()]
    for method in ("full", "lora"):
        summary = RunDir(out / "runs" / f"{method}-a-then-b").read_summary()
        assert summary["init_from"][0]["run"] == str((out / "runs" / f"{method}-a").resolve())
    rows = {(r["method"], r["how"].split(" ")[0]): r for r in results["continual"]["rows"]}
    assert set(rows) == {("full", "A"), ("lora", "A"), ("lora", "swapped"), ("lora", "combined")}
    kept = rows[("lora", "A")]
    assert kept["a_before"]["value"] == by["lora-a"]["learning"]["value"]
    assert kept["a_after"]["value"] == by["lora-a-then-b"]["learning"]["value"]
    assert kept["b"]["value"] == by["lora-a-then-b"]["own_learning"]["value"]
    assert (out / rows[("lora", "combined")]["adapter"] / "adapter_config.json").exists()

    again = compare(
        spec, out, report=False, executor=InlineExecutor()
    )  # resumable: nothing retrains, the tables are the same
    assert again["continual"] == results["continual"]


def test_study_without_second_data_is_refused() -> None:
    with pytest.raises(UserError, match="study_data"):
        build_spec({"model": "tiny-random", "data": {"train": ["x"]}, "tokens": 10, "study": "continual"})
