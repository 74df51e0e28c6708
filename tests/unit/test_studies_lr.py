"""`compare --study lr`: full and LoRA swept on the same relative grid at every seed, more validation
blocks behind each sweep point, and results.json's `lr_ratio` (LoRA's fitted best LR / full's).

    python -m pytest -q tests/unit/test_studies_lr.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import write_corpus

from adaptlab.compare import build_spec, compare
from adaptlab.compare.arms import LR_EVAL_BLOCKS, LR_GRID, expand, study_arms
from adaptlab.compare.inline import InlineExecutor
from adaptlab.errors import UserError

BASE: dict[str, Any] = {"model": "tiny-random", "data": {"train": ["x"]}, "tokens": 1000, "study": "lr"}


def test_full_and_lora_get_the_same_grid_wide_enough_for_the_claim_to_fail() -> None:
    arms = study_arms("lr", "tiny-random", 1000, base_lr=2e-5)
    assert [a.method for a in arms] == ["full", "lora"]
    full, lora = (a.lr_sweep for a in arms)
    assert full == lora == pytest.approx([2e-5 * f for f in LR_GRID])
    assert min(LR_GRID) < 1 and max(LR_GRID) > 100  # LoRA at 10x full sits inside, away from both edges
    assert all(a.sweep_every_seed for a in arms)


def test_the_lr_study_sweeps_every_seed_on_at_least_16_validation_blocks() -> None:
    spec = build_spec({**BASE, "seeds": 2, "lr_grid": [0.1, 1, 10], "train": {"eval_examples": 4}})
    plans = expand(spec, study_arms("lr", "tiny-random", 1000, spec.train.lr, lr_grid=spec.lr_grid))
    assert all(p.sweep for p in plans) and len(plans) == 2 * 2 * 3
    assert {(p.arm, p.seed_index) for p in plans} == {(a, s) for a in ("full", "lora") for s in (0, 1)}
    assert all(p.train_fields["eval_examples"] == LR_EVAL_BLOCKS for p in plans)


def test_lr_grid_is_checked() -> None:
    with pytest.raises(UserError, match="lr_grid needs at least three"):
        build_spec({**BASE, "lr_grid": [1, 10]})
    with pytest.raises(UserError, match="lr_grid is the grid of the lr study"):
        build_spec({**BASE, "study": "methods", "lr_grid": [0.1, 1, 10]})


def test_lr_study_writes_the_ratio_of_fitted_optima(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=20)
    spec = build_spec(
        {
            **BASE,
            "data": {"train": [str(data)], "test_frac": 0.2},
            "general": [str(data)],
            "drift": False,
            "tokens": 256,
            "seeds": 2,
            "lr_grid": [0.1, 1, 10],
            "train": {"lr": 1e-2, "batch": 2, "seq_len": 32, "eval_points": 1, "checkpoints": 0},
            "eval": {"max_docs": 2, "max_chars": 300, "seq_len": 64},
            "analysis": {"enabled": False},
        }
    )
    results = compare(spec, tmp_path / "cmp", report=False, executor=InlineExecutor())
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    ratio = saved["lr_ratio"]
    assert ratio["arms"] == ["full", "lora"] and ratio["seeds"] == 2 and len(ratio["per_seed"]) == 2
    by = {a["name"]: a for a in results["arms"]}
    full, lora = by["full"]["lr_optimum"], by["lora"]["lr_optimum"]
    assert ratio["estimate"] == pytest.approx(lora["fitted"] / full["fitted"])
    assert ratio["edge"] == (full["edge"] or lora["edge"])
    lo, hi = ratio["interval"]
    assert lo <= hi
    for name in ("full", "lora"):
        sweep = by[name]["lr_sweep"]
        assert [s["seed_index"] for s in sweep["per_seed"]] == [0, 1]
        for s in sweep["per_seed"]:  # an LR beyond the grid's edge is tried at every seed
            assert {pt["lr"] for pt in s["points"]} == {pt["lr"] for pt in sweep["points"]}
        assert by[name]["seeds"] == 2  # the best LR's run at each seed stands for the arm
        assert {r["run"] for r in by[name]["runs"]} == {
            pt["run"] for s in sweep["per_seed"] for pt in s["points"] if pt["lr"] == sweep["best_lr"]
        }


def test_cli_lr_grid_reaches_the_spec_and_bad_values_exit_2(run_cli, tmp_path: Path) -> None:
    from adaptlab.cli.compare import _lr_grid

    assert _lr_grid("0.1,1,10") == [0.1, 1.0, 10.0]
    data = write_corpus(tmp_path / "data", n_docs=4)
    args = ["compare", "--data", data, "--tokens", "1000", "--out", tmp_path / "o"]
    code, _, err = run_cli(*args, "--study", "lr", "--lr-grid", "0.1,x")
    assert code == 2 and "--lr-grid" in err
    code, _, err = run_cli(*args, "--study", "methods", "--lr-grid", "0.1,1,10")
    # the spec refuses it: the flag reached the spec
    assert code == 2 and "lr_grid is the grid of the lr study" in err and "Traceback" not in err
