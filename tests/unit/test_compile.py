"""`train.compile` (--compile): each decoder layer under torch.compile trains the same run as eager
(losses within float reordering), keeps the adapter's keys, and a CPU without a C++ compiler is one
clear line.

    python -m pytest -q tests/unit/test_compile.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptlab import compiling
from adaptlab.errors import UserError
from adaptlab.train import train
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


def test_a_cpu_without_a_cpp_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        compiling.compile_layers(torch.nn.Linear(2, 2), torch.device("cpu"))


def test_a_model_without_decoder_layers_is_one_line() -> None:
    with pytest.raises(UserError, match="no decoder layers"):
        compiling.compile_layers(torch.nn.Linear(2, 2), torch.device("cuda"))
