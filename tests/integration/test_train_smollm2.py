"""A few real training steps of LoRA and full fine-tuning on smollm2-135m (kept short)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, write_corpus
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adaptlab.models import local_dir
from adaptlab.rundir import RunDir
from adaptlab.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=6)


def _smollm2(cfg):
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "smollm2-135m"})})


@pytest.mark.parametrize(("method", "lr"), [("lora", 2e-3), ("full", 1e-4)])
def test_loss_falls_and_artifact_loads(corpus, tmp_path, method, lr):
    # 4 blocks cycled for 6 steps: the loss on data seen again must fall.
    cfg = _smollm2(
        tiny_config(corpus, tmp_path / "run", method=method, steps=6, batch=2, seq_len=64, lr=lr, rank=8)
    )
    summary = train(cfg)
    losses = [r["loss"] for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]
    assert losses[-1] < losses[0]
    assert summary["total_params"] >= 134_515_008
    base = AutoModelForCausalLM.from_pretrained(str(local_dir("smollm2-135m")))
    if method == "lora":
        assert summary["trainable_params"] == 2_442_240  # r=8 all-linear, as DATA.md counts
        model = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
