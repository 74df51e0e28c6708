"""`adaptlab plan` reports the optimisations `adaptlab train` applies (adaptlab.transforms): for every
method, precision, strategy and compile setting, the decisions in the plan equal what the model built by
train.prepare shows (which modules run fused, which weights are held in bf16, whether layers compile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from adaptlab import autocast_linear, compiling, cpu_attention, fused_lora, fused_norm
from adaptlab.models import decoder_layers
from adaptlab.plan import plan
from adaptlab.plan.world import plan_world
from adaptlab.train import build_model, load_base, prepare
from adaptlab.transforms import decide, transforms_for
from tests.helpers import tiny_config

TARGETS = ["q_proj", "v_proj"]  # DoRA's bases stay fp32, the other Linears are held at bf16
TOKENS = 100  # two steps of 2 x 32: 128 tokens trained


@pytest.fixture
def long_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile: auto` turns on where it may (a CPU with native bf16, any length of run)."""
    monkeypatch.setattr(compiling, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(compiling, "cpp_compiler_available", lambda: True)
    monkeypatch.setattr(compiling, "AUTO_MIN_WORK", 1.0)


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(20)))
    return path


def _planned(docs: Path, method: str, precision: str, strategy: str | None, setting: bool | str) -> dict:
    """What the planner reports it models for `method`'s run (plan, or plan_world under a strategy)."""
    common = {"seq_len": 32, "batch": 2, "targets": TARGETS, "precision": precision, "compile": setting}
    if strategy is None:
        result = plan(
            "tiny-random", [str(docs)], ranks=(4,), device="cpu", tokens=TOKENS, benchmark=False, **common
        )
        return result["methods"][method]["transforms"]
    world = plan_world("tiny-random", 2, 2**40, parallel=strategy, rank=4, device="cpu", **common)
    return world["methods"][method][strategy]["transforms"]


def _built(
    docs: Path, tmp_path: Path, method: str, precision: str, strategy: str | None, setting: Any
) -> Any:
    """The model train.prepare builds for this run (under a strategy: prepare's own steps before it wraps
    the model, which needs a process group)."""
    config = tiny_config(
        docs,
        tmp_path / "run",
        method,
        steps=None,
        tokens=TOKENS,
        precision=precision,
        compile=setting,
        targets=TARGETS,
    )
    if strategy is None:
        return prepare(config).model
    device = torch.device("cpu")
    loaded = load_base(config, device, precision, strategy)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    transforms = transforms_for(config, device, precision, strategy, n_params)
    return build_model(loaded.model, config, transforms, device, strategy)


def _observed(model: nn.Module) -> dict[str, Any]:
    """What a built model shows of each transform."""
    modules = list(model.modules())

    def forwards(fn: Any) -> bool:
        return any(getattr(m.forward, "__func__", None) is fn for m in modules)

    return {
        "compile": any(
            getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model)
        ),
        "fuse_lora": forwards(fused_lora._fused_forward),
        "fuse_norms": forwards(fused_norm._fused_block_forward),
        "fuse_linears": forwards(autocast_linear._forward),
        "recompute_mlp_product": any(getattr(m, "recompute_product", False) for m in modules),
        "cpu_attention": model.config._attn_implementation == cpu_attention.NAME,
        "held_bf16_params": sum(
            m.weight.numel() for m in modules if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16
        ),
    }


def _expected(planned: dict[str, Any], method: str) -> dict[str, Any]:
    keys = (
        "compile",
        "fuse_lora",
        "fuse_norms",
        "recompute_mlp_product",
        "cpu_attention",
        "held_bf16_params",
    )
    out = {k: planned[k] for k in keys}
    # the LoRA family trains no plain Linear: the fused LoRA Linear is what saves its uncast input
    out["fuse_linears"] = planned["fuse_linears"] and method == "full"
    return out


@pytest.mark.usefixtures("long_enough")
@pytest.mark.parametrize("setting", [True, False, "auto"])
@pytest.mark.parametrize("strategy", [None, "ddp", "fsdp"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plan_models_what_train_applies(
    docs: Path, tmp_path: Path, precision: str, strategy: str | None, setting: bool | str
) -> None:
    for method in ("full", "lora", "dora", "qlora"):
        if method == "qlora" and strategy == "fsdp":
            continue  # refused by both (a 4-bit base cannot be sharded)
        planned = _planned(docs, method, precision, strategy, setting)
        built = _built(docs, tmp_path / method, method, precision, strategy, setting)
        assert _observed(built) == _expected(planned, method), (method, planned["why"])


@pytest.mark.usefixtures("long_enough")
def test_the_plan_weighs_the_whole_steps_train_runs(
    docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto` weighs the tokens of the run's whole steps (100 tokens are two steps of 64): a budget just
    under the threshold that train's rounding carries over compiles in both, not in train alone."""
    n_params = 3_219_776  # tiny-random
    monkeypatch.setattr(compiling, "AUTO_MIN_WORK", n_params * 110.0)
    planned = plan(
        "tiny-random",
        [str(docs)],
        seq_len=32,
        batch=2,
        device="cpu",
        precision="bf16",
        tokens=TOKENS,
        benchmark=False,
    )["methods"]["full"]["compile"]
    config = tiny_config(docs, tmp_path / "run", "full", steps=None, tokens=TOKENS, precision="bf16")
    setup = prepare(config)
    assert sum(p.numel() for p in setup.model.parameters()) == n_params
    assert setup.compiled is True and planned["on"] is True


def test_each_decision_says_why() -> None:
    t = decide(
        method="lora",
        device_type="cpu",
        precision="bf16",
        strategy="fsdp",
        compile=True,
        grad_checkpointing=True,
    )
    assert not (t.fuse_lora or t.fuse_norms or t.fuse_linears or t.hold_base_bf16 or t.recompute_mlp_product)
    assert t.why["fuse_norms"] == "fused norms: off (compiled, FSDP2, activation checkpointing)"
    assert t.why["hold_base_bf16"] == "frozen Linears held in bf16: off (FSDP2)"
    assert decide(
        method="dora",
        device_type="cpu",
        precision="bf16",
        strategy=None,
        compile=False,
        grad_checkpointing=False,
    ).hold_base_bf16


def test_plan_command_takes_train_s_compile_setting(docs: Path, run_cli: Any) -> None:
    """`adaptlab plan --compile` plans the paths a compiled run takes, per GPU strategy too; the table
    prints each method's decisions."""
    args = ["plan", "--model", "tiny-random", "--data", docs, "--device", "cpu", "--precision", "bf16"]
    args += ["--no-benchmark", "--compile", "--gpus", "2", "--memory", "80GiB"]
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    result = json.loads(out)
    lora = result["methods"]["lora"]
    assert lora["compile"] == {"on": True, "why": "compile: on (set)"}
    assert lora["transforms"]["lora_forward"] == "peft" and not lora["transforms"]["fuse_norms"]
    assert all(result["world"]["methods"]["lora"][s]["transforms"]["compile"] for s in ("ddp", "fsdp"))
    code, out, err = run_cli(*args)
    assert code == 0, err
    assert "lora: compile: on (set); fused LoRA Linears: off (compiled)" in " ".join(out.split())


def test_the_estimates_follow_the_decisions(docs: Path) -> None:
    """A compiled run keeps what the fused kernels would not (norm outputs, bf16 casts): the plan's
    memory for it is the unfused paths', and its frozen Linears are still held in bf16."""
    common = {"seq_len": 32, "batch": 2, "device": "cpu", "precision": "bf16", "benchmark": False}
    eager = plan("tiny-random", [str(docs)], compile=False, **common)["methods"]["lora"]
    compiled = plan("tiny-random", [str(docs)], compile=True, **common)["methods"]["lora"]
    assert compiled["memory"]["activations"] > eager["memory"]["activations"]
    assert compiled["memory"]["weights"] == eager["memory"]["weights"]
    assert compiled["transforms"]["held_bf16_params"] == eager["transforms"]["held_bf16_params"] > 0
