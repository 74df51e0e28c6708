"""`train --init-from RUN` on tiny-random: the first step's loss is the previous run's loss on the same
batch, the chain is recorded in summary.json, mismatches are refused in one line.

    python -m pytest -q tests/unit/test_init_from.py
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config, write_corpus

from adaptlab.artifacts import load_tuned
from adaptlab.errors import UserError
from adaptlab.objectives.sft import SFTObjective, token_loss_sum
from adaptlab.rundir import RunDir
from adaptlab.train import prepare, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=20)


@pytest.fixture(scope="module")
def runs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoRA run and a full run of 3 steps on the corpus."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in ("lora", "full"):
        cfg = tiny_config(corpus, root / method, method=method, steps=3, lr=3e-3)
        train(cfg)
        out[method] = root / method
    return out


def _loss_of(model: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    model.train()  # as the loop computes it (tiny-random has no dropout)
    with torch.no_grad():
        sums = [token_loss_sum(model, b) for b in batches]
    return sum(float(s) for s, _ in sums) / sum(n for _, n in sums)


@pytest.mark.parametrize(("before", "method"), [("lora", "lora"), ("full", "full"), ("lora", "full")])
def test_first_step_loss_is_the_previous_runs_loss_on_that_batch(
    runs: dict[str, Path], corpus: Path, tmp_path: Path, before: str, method: str
) -> None:
    cfg = tiny_config(corpus, tmp_path / "next", method=method, steps=1, seed=7)
    cfg.model.init_from = str(runs[before])
    batches = SFTObjective().micro_batches(
        prepare(cfg), 0
    )  # the new run's first batch (its data order, its seed)
    tuned, _ = load_tuned(runs[before])
    want = _loss_of(tuned.model, batches)

    train(cfg)
    first = next(r for r in RunDir(tmp_path / "next").read_metrics() if "loss" in r)
    assert first["step"] == 1 and first["loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)

    fresh = tiny_config(corpus, tmp_path / "fresh", method=method, steps=1, seed=7)
    base_loss = _loss_of(prepare(fresh).model, batches)  # without --init-from the step starts elsewhere
    assert abs(base_loss - want) > 1e-3


def test_chain_is_recorded_in_summary(runs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    second = tiny_config(corpus, tmp_path / "b", steps=1)
    second.model.init_from = str(runs["lora"])
    summary_b = train(second)
    assert [c["run"] for c in summary_b["init_from"]] == [str(runs["lora"].resolve())]
    first = RunDir(runs["lora"]).read_summary()
    assert summary_b["init_from"][0]["final_train_loss"] == first["final_train_loss"]
    assert summary_b["init_from"][0]["data"] == [str(corpus)]

    third = tiny_config(corpus, tmp_path / "c", steps=1)
    third.model.init_from = str(tmp_path / "b")
    summary_c = train(third)
    assert [c["run"] for c in summary_c["init_from"]] == [
        str((tmp_path / "b").resolve()),
        str(runs["lora"].resolve()),
    ]
    assert "init_from: " in (tmp_path / "c" / "config.yaml").read_text()


def test_mismatches_are_refused(runs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    lora_on_full = tiny_config(corpus, tmp_path / "x", method="lora", steps=1)
    lora_on_full.model.init_from = str(runs["full"])
    with pytest.raises(UserError, match="pass --model"):
        prepare(lora_on_full)
    other_rank = tiny_config(corpus, tmp_path / "y", method="lora", rank=2, steps=1)
    other_rank.model.init_from = str(runs["lora"])
    with pytest.raises(UserError, match="same settings"):
        prepare(other_rank)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text(copy.deepcopy((runs["lora"] / "config.yaml").read_text()))
    cfg = tiny_config(corpus, tmp_path / "z", steps=1)
    cfg.model.init_from = str(unfinished)
    with pytest.raises(UserError):
        prepare(cfg)


def test_cli_flag(run_cli: Any, runs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(
        "train",
        "--model",
        "tiny-random",
        "--method",
        "full",
        "--data",
        corpus,
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--precision",
        "fp32",
        "--init-from",
        runs["lora"],
        "--out",
        tmp_path / "r",
        "--quiet",
    )
    assert code == 0, err
    assert RunDir(tmp_path / "r").read_summary()["init_from"][0]["method"] == "lora"
    code, _, err = run_cli(
        "train",
        "--model",
        "tiny-random",
        "--data",
        corpus,
        "--steps",
        "1",
        "--init-from",
        tmp_path / "nope",
        "--out",
        tmp_path / "s",
    )
    assert code == 2 and "no such file" in err
