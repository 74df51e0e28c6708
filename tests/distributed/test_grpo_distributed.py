"""GRPO on two processes (torchrun, gloo on CPU) takes the steps of one: each completion row samples from
its own generator, seeded by its place in the global batch, so the ranks draw the completions one process
draws, and the rewards, losses and adapter weights agree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_in_child
from safetensors.torch import load_file

from adaptlab.config import build_config
from adaptlab.rundir import RunDir
from adaptlab.train import train

pytestmark = pytest.mark.distributed

REL = 1e-5
METRICS = ("loss", "reward", "reward_std", "completion_len", "kl")
REWARD = "python:grpo_dist_reward:score"


def _config(out: Path) -> object:
    return build_config(
        {
            "model": {"name": "tiny-random"},
            "method": {"method": "lora", "rank": 4},
            "data": {"train": ["arithmetic"]},
            "train": {
                "steps": 2,
                "batch": 4,
                "seq_len": 96,
                "precision": "fp32",
                "lr": 1e-2,
                "eval_examples": 4,
            },
            "objective": {
                "task": "grpo",
                "group_size": 4,
                "max_new_tokens": 6,
                "reward": REWARD,
                "prompts_per_step": 4,
                "kl_beta": 0.05,
            },
            "out": str(out),
        }
    )


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in METRICS} for r in RunDir(run).read_metrics() if "loss" in r]


def test_two_processes_sample_and_take_the_grpo_steps_of_one(tmp_path: Path, monkeypatch) -> None:
    # a reward that varies between random completions, so tiny-random's steps are not all zero
    (tmp_path / "grpo_dist_reward.py").write_text(
        "def score(prompt, completion, answer):\n    return float(sum(map(ord, completion)) % 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    train(_config(tmp_path / "one"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(_config(tmp_path / "two").to_yaml())
    proc = train_in_child(
        "--config",
        str(cfg),
        "--nproc",
        "2",
        "--parallel",
        "ddp",
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(one) == 2 and any(r["reward_std"] > 0 for r in one)
    for a, b in zip(one, two, strict=True):
        assert [b[k] for k in METRICS] == pytest.approx([a[k] for k in METRICS], rel=REL, abs=1e-6)
    artifact = "adapter/adapter_model.safetensors"
    wa, wb = load_file(str(tmp_path / "one" / artifact)), load_file(str(tmp_path / "two" / artifact))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=REL, atol=REL)
    sys.modules.pop("grpo_dist_reward", None)
