"""DPO on two processes (torchrun, gloo on CPU) takes the steps of one: losses, rewards and weights.

Full fine-tuning under FSDP2 computes its reference log-probs with every rank taking part in each
forward; the LoRA family under DDP scores its reference with the adapter disabled.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config, train_in_child
from safetensors.torch import load_file

from adaptlab.config import ObjectiveSpec
from adaptlab.rundir import RunDir
from adaptlab.train import train

pytestmark = pytest.mark.distributed

REL = 1e-5
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory):
    lines = (shared_data / "preference" / "wordnet_define_pairs.jsonl").read_text().splitlines()[:24]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo_config(data, out, method, **train_fields):
    cfg = tiny_config(data, out, method=method, seq_len=80, **train_fields)
    cfg.objective = ObjectiveSpec(task="dpo", beta=0.1)
    return cfg


def _rows(run):
    return [{k: r[k] for k in METRICS} for r in RunDir(run).read_metrics() if "loss" in r]


@pytest.mark.parametrize(("method", "parallel"), [("lora", "ddp"), ("full", "fsdp")])
def test_two_processes_take_the_dpo_steps_of_one(pairs, tmp_path, method, parallel):
    one = tmp_path / "one"
    train(dpo_config(pairs, one, method=method, steps=3, grad_accum=2))
    two = tmp_path / "two"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(dpo_config(pairs, two, method=method, steps=3, grad_accum=2).to_yaml())
    proc = train_in_child("--config", str(cfg), "--nproc", "2", "--parallel", parallel)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for a, b in zip(_rows(one), _rows(two), strict=True):
        assert [b[k] for k in METRICS] == pytest.approx([a[k] for k in METRICS], rel=REL, abs=1e-6)
    assert json.loads((two / "summary.json").read_text())["final_val"] == pytest.approx(
        json.loads((one / "summary.json").read_text())["final_val"], rel=REL, abs=1e-6
    )
    artifact = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    wa, wb = load_file(str(one / artifact)), load_file(str(two / artifact))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=REL, atol=REL)
