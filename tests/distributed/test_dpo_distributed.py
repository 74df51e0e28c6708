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
# A reward is beta times a difference of summed log-probs (tens to hundreds of nats): the fp32 rounding of
# those sums, which differs with how the work is split, moves it by about 1e-6 whatever its size (1.5e-6
# seen under FSDP2 with avx512 kernels), so rewards are compared within an absolute 1e-5, the loss relatively.
REWARD_ABS = 1e-5


def _close(b: dict, a: dict) -> None:
    """b's metrics equal a's: rewards within REWARD_ABS, the loss and the rest within REL."""
    assert a.keys() == b.keys()
    rewards = [k for k in a if k.startswith("rewards/")]
    rest = [k for k in a if k not in rewards]
    assert [b[k] for k in rewards] == pytest.approx([a[k] for k in rewards], abs=REWARD_ABS), rewards
    assert [b[k] for k in rest] == pytest.approx([a[k] for k in rest], rel=REL, abs=1e-6), rest


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
        # while the policy equals its reference (the first step) every pair's margin is rounding noise,
        # and the share of margins above 0 is the sign of that noise: compared only past it
        if abs(a["rewards/margins"]) <= 1e-6:
            del a["rewards/accuracies"], b["rewards/accuracies"]
        _close(b, a)
    val_a = json.loads((one / "summary.json").read_text())["final_val"]
    val_b = json.loads((two / "summary.json").read_text())["final_val"]
    _close(
        {k.removeprefix("val_"): v for k, v in val_b.items()},
        {k.removeprefix("val_"): v for k, v in val_a.items()},
    )
    artifact = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    wa, wb = load_file(str(one / artifact)), load_file(str(two / artifact))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=REL, atol=REL)
