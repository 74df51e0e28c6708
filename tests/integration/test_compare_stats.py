"""Seeds, sweep-then-replicate with a grid that extends at its edge, and budget extrapolation, end to
end on tiny-random."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import write_corpus

from adaptlab.compare.sweeps import MAX_SWEEP_EXTENSIONS
from adaptlab.report.extrapolate import extrapolate

GENERAL = [
    "The weather was mild and the market square filled with people buying bread and fruit.",
    "She wrote a long letter to her grandmother about the trip to the coast.",
    "Regular exercise and enough sleep help most people feel better during the day.",
    "A good budget lists income first, then fixed costs, then everything else.",
]


def _spec(tmp_path: Path, arms: list[dict[str, Any]], **extra: Any) -> Path:
    data = write_corpus(tmp_path / "data", n_docs=40)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"id": f"g{i}", "text": t}) + "\n" for i, t in enumerate(GENERAL)))
    spec = {
        "model": "tiny-random",
        "data": {"train": [str(data)], "val_frac": 0.1, "test_frac": 0.2},
        "general": [str(general)],
        "drift": False,
        "tokens": 256,
        "train": {
            "batch": 2,
            "seq_len": 32,
            "lr": 1e-3,
            "precision": "fp32",
            "eval_points": 1,
            "eval_examples": 4,
        },
        "eval": {"max_docs": 8, "max_chars": 600, "seq_len": 64, "batch": 8},
        "analysis": {"enabled": False},
        "arms": arms,
        "seeds": 1,
        **extra,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_seeds_and_sweep_then_replicate_end_to_end(run_cli, tmp_path: Path) -> None:
    grid = [1e-4, 3e-4]
    arms = [
        {"name": "lora", "method": "lora", "rank": 4, "lr_sweep": grid},
        {"name": "full", "method": "full"},
    ]
    out = tmp_path / "out"
    code, _, err = run_cli(
        "compare", "--config", _spec(tmp_path, arms, seeds=2), "--out", out, "--executor", "inline"
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    by = {a["name"]: a for a in results["arms"]}
    sweep = by["lora"]["lr_sweep"]
    lrs = sorted(p["lr"] for p in sweep["points"])
    # the best LR of this grid lies at its top edge: the sweep goes on a grid step further each time
    assert 1 <= sweep["grid_extensions"] <= MAX_SWEEP_EXTENSIONS
    assert len(lrs) == len(grid) + sweep["grid_extensions"]
    assert lrs[len(grid)] == pytest.approx(9e-4)
    assert sum(p["beyond_grid"] for p in sweep["points"]) == sweep["grid_extensions"]
    assert "beyond the grid" in (out / "report.md").read_text()
    assert not sweep["best_at_edge"] or sweep["grid_extensions"] == MAX_SWEEP_EXTENSIONS
    # the replicate (seed 1) trains at the LR the sweep chose; both seeds stand for the arm
    runs = by["lora"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    replicate = yaml.safe_load((out / "runs" / runs[1]["run"] / "config.yaml").read_text())
    assert replicate["train"]["lr"] == pytest.approx(sweep["best_lr"])
    for a in by.values():
        assert a["learning"]["spread"]["n"] == 2
        assert len(a["per_doc"]["target"]["nll"]) == 2  # one row of per-document NLL per seed
    rec = results["recommendation"]
    (row,) = rec["vs_pick"]
    assert row["learning"]["paired"] and row["forgetting"]["paired"]
    lo, hi = row["learning"]["ci95"]
    assert lo <= row["learning"]["value"] <= hi


def test_power_law_fitted_on_a_quarter_and_a_half_predicts_the_full_budget(run_cli, tmp_path: Path) -> None:
    full_budget = 2048
    arms = [
        {"name": f"full-{tag}", "method": "full", "lr": 1e-3, "tokens": full_budget // div}
        for tag, div in (("q", 4), ("h", 2), ("all", 1))
    ]
    out = tmp_path / "out"
    cfg = _spec(tmp_path, arms, tokens=full_budget, target_tokens=4 * full_budget)
    spec = yaml.safe_load(cfg.read_text())
    spec["eval"]["target_kl"] = False  # not needed here: the target KL is opt-out
    cfg.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli("compare", "--config", cfg, "--out", out, "--executor", "inline")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    by = {a["name"]: a for a in results["arms"]}
    ex = extrapolate([by["full-q"], by["full-h"]], results["forgetting_metric"], target_tokens=full_budget)
    (fam,) = ex["families"]
    lo, hi = fam["learning"]["ci95"]
    measured = by["full-all"]["learning"]["value"]
    assert lo <= measured <= hi, (fam["learning"], measured)
    assert not ex["far"] and ex["factor"] == pytest.approx(2.0)
    # the comparison fits all three budgets, extrapolates to --target-tokens and runs the same check
    full = results["extrapolation"]
    (fam_all,) = full["families"]
    assert full["target_tokens"] == 4 * full_budget and fam_all["arms"] == list(by)
    assert fam_all["learning"]["holdout"]["ci95"] == pytest.approx([lo, hi])
    assert fam_all["learning"]["holdout"]["within"]
    ev = json.loads((out / by["full-all"]["runs"][0]["dir"] / "eval.json").read_text())
    assert "target_kl" not in ev and "target" in ev
