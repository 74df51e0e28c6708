"""`train.compile` (--compile): each decoder layer under torch.compile trains the same run as eager
(losses within float reordering), keeps the adapter's keys, and a CPU without a C++ compiler is one
clear line. `auto` (the default) compiles only a long single-process bf16 SFT run on a CPU with native
bf16, and a comparison's runs all decide alike.

    python -m pytest -q tests/unit/test_compile.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptlab import compiling
from adaptlab.compare.arms import expand
from adaptlab.compare.spec import build_spec
from adaptlab.errors import UserError
from adaptlab.models import load_model
from adaptlab.train import resume_run, train
from tests.helpers import tiny_config, write_corpus


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "tokens_per_s" in r]


def test_compiled_layers_train_the_eager_run(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=12)
    eager = train(tiny_config(data, tmp_path / "eager", steps=3))
    compiled = train(tiny_config(data, tmp_path / "compiled", steps=3, compile=True))
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)
    weights = {
        p: load_file(tmp_path / p / "adapter" / "adapter_model.safetensors") for p in ("eager", "compiled")
    }
    assert weights["eager"].keys() == weights["compiled"].keys()  # no _orig_mod / compile prefixes
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, rtol=1e-3, atol=1e-5)


def test_a_compiled_run_resumes_where_it_was_cut(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=12)
    whole = tiny_config(data, tmp_path / "whole", steps=5, compile=True)
    train(whole)

    def stop_at_4(row: dict) -> None:
        if row.get("step") == 4 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "cut", steps=5, save_every=1, compile=True), on_log=stop_at_4)
    summary = resume_run(tmp_path / "cut")
    assert summary["compiled"] is True
    assert _losses(tmp_path / "cut") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-5)


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_a_compile_setting_other_than_true_false_or_auto_is_one_line(tmp_path: Path, value: object) -> None:
    with pytest.raises(UserError, match="train.compile: true, false or auto"):
        tiny_config(tmp_path, tmp_path / "run", compile=value)


def test_a_cpu_without_a_cpp_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compiling.compile_layers(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_a_model_without_decoder_layers_is_one_line() -> None:
    with pytest.raises(UserError, match="no decoder layers"):
        compiling.compile_layers(torch.nn.Linear(2, 2), torch.device("cuda"))


LONG = dict(
    method="lora",
    device=torch.device("cpu"),
    precision="bf16",
    world_size=1,
    task="sft",
    grad_checkpointing=False,
    optimizer_in_backward=False,
    work=compiling.AUTO_MIN_WORK,
)


@pytest.fixture
def native_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiling, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(compiling, "cpp_compiler_available", lambda: True)


@pytest.mark.usefixtures("native_bf16_cpu")
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({}, None),
        ({"method": "full"}, None),
        ({"method": "dora"}, "dora was measured no faster"),
        ({"method": "qlora"}, "qlora was measured no faster"),
        ({"work": compiling.AUTO_MIN_WORK / 2}, "too short"),
        ({"precision": "fp32"}, "native bf16"),
        ({"device": torch.device("cuda")}, "not measured on cuda"),
        ({"world_size": 2}, "several processes"),
        ({"task": "dpo"}, "not measured for dpo"),
        ({"grad_checkpointing": True}, "activation checkpointing"),
        ({"optimizer_in_backward": True}, "optimizer-in-backward"),
    ],
)
def test_auto_compiles_only_where_measured_to_pay(change: dict, words: str | None) -> None:
    blockers = compiling.auto_blockers(**{**LONG, **change})
    compiled, why = compiling.resolve("auto", blockers)
    assert compiled is (words is None)
    assert (words or "compile: on (auto") in why


def test_auto_stays_eager_on_a_cpu_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiling, "cpu_has_native_bf16", lambda: False)
    assert compiling.resolve("auto", compiling.auto_blockers(**LONG))[0] is False


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_wins_over_auto(setting: bool) -> None:
    assert compiling.resolve(setting, ["too short"]) == (
        setting,
        f"compile: {'on' if setting else 'off'} (set)",
    )


@pytest.mark.usefixtures("native_bf16_cpu")
@pytest.mark.parametrize(("min_work", "compiled"), [(compiling.AUTO_MIN_WORK, False), (1.0, True)])
def test_a_run_resolves_auto_by_its_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_work: float, compiled: bool
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(compiling, "AUTO_MIN_WORK", min_work)
    monkeypatch.setattr(compiling, "compile_layers", lambda model, device: calls.append(1) or 0)
    data = write_corpus(tmp_path / "data", n_docs=8)
    summary = train(tiny_config(data, tmp_path / "run", steps=2, precision="bf16"))
    assert summary["compiled"] is compiled
    assert bool(calls) is compiled


def _compare(tokens: dict[str, int]) -> dict[str, object]:
    arms = [{"name": n, "method": n, "tokens": t} for n, t in tokens.items()]
    spec = build_spec(
        {"model": "tiny-random", "data": {"train": ["python-stdlib"]}, "tokens": 1000, "arms": arms}
    )
    return {p.arm: p.train_fields["compile"] for p in expand(spec, spec.arms)}


def test_a_comparison_compiles_all_its_runs_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    n_params = sum(p.numel() for p in load_model("tiny-random").model.parameters())
    monkeypatch.setattr(compiling, "AUTO_MIN_WORK", n_params * 10_000)
    assert _compare({"full": 20_000, "lora": 20_000}) == {"full": "auto", "lora": "auto"}
    assert _compare({"full": 20_000, "lora": 5_000}) == {"full": False, "lora": False}
    assert _compare({"full": 20_000, "dora": 20_000}) == {"full": False, "dora": False}


@pytest.mark.usefixtures("native_bf16_cpu")
@pytest.mark.parametrize(("min_work", "on"), [(compiling.AUTO_MIN_WORK, set()), (1.0, {"full", "lora"})])
def test_plan_says_what_auto_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_work: float, on: set
) -> None:
    from adaptlab.plan import plan

    monkeypatch.setattr(compiling, "AUTO_MIN_WORK", min_work)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(20)))
    methods = plan(
        "tiny-random", [str(docs)], seq_len=64, batch=2, device="cpu", precision="bf16", benchmark=False
    )["methods"]
    assert {k for k, m in methods.items() if m["compile"]["on"]} == on
    assert all(m["compile"]["why"].startswith("compile: ") for m in methods.values())
    assert "qlora was measured no faster" in methods["qlora"]["compile"]["why"]
