"""Comparisons replicate by default: three seeds per arm for compare, reproduce and the RL study, 64
held-out documents per probe in reproduce, a seeds count on every result, and one seed reported as
unreplicated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaptlab import reproduce as rep
from adaptlab.compare.rl import RLStudy, combine_seeds, rank1_vs_full, render, run_config
from adaptlab.compare.spec import build_spec, demo_spec
from adaptlab.data.corpus import split_documents
from adaptlab.data.sources import load_documents
from adaptlab.errors import UserError
from adaptlab.evaluate.task import TaskScores


def test_a_comparison_replicates_three_times_unless_told_and_the_help_says_so(run_cli) -> None:
    spec = build_spec({"model": "tiny-random", "data": {"train": ["x"]}, "tokens": 100, "study": "methods"})
    assert spec.seeds == 3
    code, out, _ = run_cli("compare", "--help")
    assert code == 0 and "default 3" in " ".join(out.split())
    assert build_spec(demo_spec()).seeds == 1  # the 15-minute demo, reported as unreplicated


def test_reproduce_passes_seeds_and_scores_64_held_out_documents_per_domain(shared_data: Path) -> None:
    comparisons = rep.plan(shared_data, model="tiny-random")
    for c in comparisons:
        assert c.spec["seeds"] == 3, c.key
    two = rep.plan(shared_data, model="tiny-random", scale=rep.Scale(seeds=2))
    assert {c.spec["seeds"] for c in two} == {2}
    assert next(c for c in two if c.study == "rl").spec["seeds"] == 2
    for c in comparisons:
        if c.study == "rl":
            continue
        spec = build_spec(c.spec, source=c.key)
        assert spec.eval.max_docs >= 64
        held_out = split_documents(
            load_documents(spec.data.train), "test", spec.data.val_frac, spec.data.test_frac
        )
        assert len(held_out) >= 64, c.key
        if spec.general:
            assert len(load_documents(spec.general)) >= 64


def test_reproduce_cli_takes_seeds(run_cli, shared_data: Path) -> None:
    args = ["reproduce", "--data-root", shared_data, "--out", "unused", "--dry-run", "--model", "tiny-random"]
    code, _, err = run_cli(*args, "--studies", "methods", "--domains", "legal", "--seeds", "0")
    assert code == 2 and "--seeds" in err
    code, out, _ = run_cli("reproduce", "--help")
    assert "--seeds" in out and "default: 3" in out


def test_too_few_documents_for_the_held_out_documents_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    path.write_text("".join(f'{{"id": "d{i}", "text": "text {i}"}}\n' for i in range(20)))
    with pytest.raises(UserError, match="too few to hold out that many; lower --eval-docs"):
        rep.held_out_frac(path, 64)


def _scores(pass1: list[float]) -> TaskScores:
    a = np.asarray(pass1, float)
    return TaskScores(pass1=a, mean_k=a, k=1)


def _row(arm: str, pass1: float, drift: float, seed: int) -> dict[str, Any]:
    return {
        "arm": arm,
        "task": "grpo",
        "method": "lora",
        "rank": 1,
        "lr": 1e-4,
        "pass1": pass1,
        "delta_pass1": 0.0,
        "delta_pass1_ci95": [0.0, 0.0],
        "mean_reward_k": pass1,
        "drift_kl": drift,
        "drift_ci95": [drift - 0.01, drift + 0.01],
        "train_s": 1.0,
        "trainable_params": 10,
        "seed": seed,
    }


def test_rl_rows_combine_seeds_pairing_prompts_and_seeds() -> None:
    base = _scores([0, 0, 1, 0, 1, 0, 0, 1])
    seeds = [
        _scores([1, 0, 1, 0, 1, 1, 0, 1]),
        _scores([1, 1, 1, 0, 1, 0, 0, 1]),
        _scores([0, 0, 1, 1, 1, 1, 0, 1]),
    ]
    per_seed = [
        _row("lora-r1", float(s.pass1.mean()), d, i) for i, (s, d) in enumerate(zip(seeds, (0.1, 0.2, 0.3)))
    ]
    row = combine_seeds(per_seed, seeds, base)
    assert row["seeds"] == 3 and [r["seed"] for r in row["per_seed"]] == [0, 1, 2]
    assert row["pass1"] == pytest.approx(np.mean([s.pass1.mean() for s in seeds]))
    assert row["delta_pass1"] == pytest.approx(row["pass1"] - base.pass1.mean())
    lo, hi = row["delta_pass1_ci95"]
    assert lo < row["delta_pass1"] < hi
    assert row["drift_kl"] == pytest.approx(0.2)
    dlo, dhi = row["drift_ci95"]
    assert dhi - dlo > 2 * 0.1  # the seeds' spread, not just one seed's interval
    one = combine_seeds(per_seed[:1], seeds[:1], base)
    assert one["seeds"] == 1 and "per_seed" not in one
    verdict = rank1_vs_full({"lora-r1": seeds, "full": [base, base, base]})
    assert verdict is not None and verdict["delta_pass1"] == pytest.approx(row["delta_pass1"])


def test_rl_study_seeds_reach_each_run_and_the_report() -> None:
    study = RLStudy(model="tiny-random", ranks=(1,))
    assert study.seeds == 3
    arm = study.arms()[0]
    assert run_config(study, arm, Path("r"), None, seed=2)["train"]["seed"] == 2
    with pytest.raises(UserError, match="--seeds 0"):
        RLStudy(seeds=0)
    results = {
        "study": {
            "study": "rl",
            "model": "m",
            "task": "t",
            "steps": 1,
            "prompts_per_step": 1,
            "group_size": 1,
        },
        "base": {"pass1": 0.1, "n": 8},
        "arms": [],
        "rank1_vs_full": None,
    }
    assert "unreplicated" in render({**results, "seeds": 1})
    assert "unreplicated" not in render({**results, "seeds": 3})


def test_compare_rl_passes_seeds(run_cli, tmp_path: Path, monkeypatch) -> None:
    import adaptlab.compare.rl as rl

    seen: list[RLStudy] = []

    def record(study: RLStudy, out: str, on_event: object = None) -> dict:  # the study's settings only
        seen.append(study)
        Path(out, "report.md").write_text("report\n")
        return {}

    monkeypatch.setattr(rl, "run_study", record)
    code, _, err = run_cli(
        "compare", "--study", "rl", "--model", "tiny-random", "--seeds", "2", "--out", tmp_path / "s"
    )
    assert code == 0, err
    assert seen[0].seeds == 2


def test_the_estimate_counts_every_replicate(shared_data: Path) -> None:
    def estimate(seeds: int) -> float:
        scale = rep.Scale(seeds=seeds)
        return rep.estimate_s(rep.plan(shared_data, "tiny-random", scale, ("methods", "rl"), ("legal",)))

    assert estimate(3) == pytest.approx(3 * estimate(1), rel=0.05)
