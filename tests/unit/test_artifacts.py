"""Tuned artifacts on tiny-random: what `resolve` reads, and a PEFT-style grid over lora, rslora, dora, qlora.

The grid trains each method for a few steps, then checks:
  - adaptlab-loaded logits (artifacts.load_tuned) == PEFT-loaded (PeftModel.from_pretrained on the base
    prepared as in training) == merged (`adaptlab merge`, reloaded with transformers). Tolerances, fp32:
    loaded vs PEFT exact (the same operations); merged within 1e-4 max abs logit (W0 x + s B A x
    against (W0 + s B A) x, rounded differently).
  - every trainable parameter changed and every frozen one did not;
  - rsLoRA merges with scaling alpha / sqrt(r) exactly (1e-6 on the weights), not alpha / r.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_corpus

from adaptlab.adapters import merge_adapter
from adaptlab.artifacts import attach_adapter, load_tuned, resolve
from adaptlab.errors import UserError
from adaptlab.models import load_model
from adaptlab.train import train

METHODS = ("lora", "rslora", "dora", "qlora")
RANK, ALPHA = 4, 16.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, dict]:
    """One short run per method, with every parameter as it was before training."""
    root = tmp_path_factory.mktemp("runs")
    out: dict[str, dict] = {}
    for method in METHODS:
        captured: dict = {}

        def on_start(setup, captured=captured):
            captured["model"] = setup.model
            captured["before"] = {n: p.detach().clone() for n, p in setup.model.named_parameters()}

        cfg = tiny_config(
            corpus,
            root / method,
            method="lora" if method == "rslora" else method,
            rslora=method == "rslora",
            rank=RANK,
            alpha=ALPHA,
            steps=3,
            lr=1e-2,
            warmup=0.0,
        )
        train(cfg, on_start=on_start)
        out[method] = {"run": root / method, **captured}
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(7))


@torch.inference_mode()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=_ids()).logits  # (B, T, vocab)


# ---------------------------------------------------------------------------------------------
# resolve


def test_resolve_reads_each_fact_once_from_a_run_its_adapter_and_a_copied_adapter(runs, tmp_path):
    run = runs["qlora"]["run"]
    for path in (run, run / "adapter"):
        art = resolve(path)
        assert (art.kind, art.source, art.run_dir, art.path) == ("adapter", "run", run, run / "adapter")
        assert (art.base_model, art.method, art.trained_on_4bit) == ("tiny-random", "qlora", True)
        assert art.quantization["quant_type"] == "nf4" and art.quantization["compute_dtype"] == "float32"
    copied = shutil.copytree(runs["rslora"]["run"] / "adapter", tmp_path / "copied")
    art = resolve(copied)
    assert (art.source, art.run_dir, art.method, art.quantization) == ("adapter", None, "rslora", None)
    assert art.base_model  # what peft recorded in adapter_config.json


def test_resolve_a_model_dir_and_refuse_what_is_not_a_tuned_artifact(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "full")
    art = resolve(tmp_path / "full")
    assert (art.kind, art.source, art.method) == ("model", "model", "full")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text("model: {name: tiny-random}\n")
    (tmp_path / "file").write_text("x")
    for path, message in (
        (tmp_path / "unfinished", "has not finished"),
        (tmp_path / "file", "is a file"),
        (tmp_path / "nothing", "no such file"),
        (tmp_path, "not a tuned artifact"),
    ):
        with pytest.raises(UserError, match=message):
            resolve(path)


def test_attach_adapter_adds_beside_others_and_leaves_a_failed_name_out(runs):
    base = load_model("tiny-random")
    lora, rslora = resolve(runs["lora"]["run"]), resolve(runs["rslora"]["run"])
    model = attach_adapter(base.model, lora, "tiny-random", "a")
    same = attach_adapter(model, rslora, "tiny-random", "b")
    assert same is model and set(model.peft_config) == {"a", "b"}
    with pytest.raises(UserError, match="was trained on 'tiny-random', not on 'smollm2-135m'"):
        attach_adapter(model, lora, "smollm2-135m", "c")
    assert set(model.peft_config) == {"a", "b"}


# ---------------------------------------------------------------------------------------------
# the grid


def _peft_loaded(method: str, run: Path) -> torch.nn.Module:
    """The adapter loaded the plain PEFT way, on the base prepared as in training."""
    from peft import PeftModel

    from adaptlab.quantize import quantize_base

    base = load_model("tiny-random").model
    if method == "qlora":
        quantize_base(base)
    return PeftModel.from_pretrained(base, str(run / "adapter"))


@pytest.mark.parametrize("method", METHODS)
def test_loaded_equals_peft_equals_merged(runs, method, tmp_path):
    run = runs[method]["run"]
    loaded, art = load_tuned(run)
    assert art.method == method
    ours = _logits(loaded.model)
    assert torch.equal(ours, _logits(_peft_loaded(method, run)))
    report = merge_adapter(run, tmp_path / "merged", into="dequantized" if method == "qlora" else None)
    assert report.max_abs_diff < 1e-4
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (_logits(merged) - ours).abs().max() < 1e-4
    assert not torch.allclose(_logits(load_model("tiny-random").model), ours, atol=1e-4)  # it learned


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_all_changed_and_frozen_ones_did_not(runs, method):
    model, before = runs[method]["model"], runs[method]["before"]
    now = dict(model.named_parameters())
    trainable = [n for n, p in now.items() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if method == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    unchanged = [n for n in trainable if torch.equal(now[n].detach(), before[n])]
    assert unchanged == []
    changed = [n for n, p in now.items() if not p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert changed == []


def test_rslora_merges_with_alpha_over_sqrt_r_exactly(runs, tmp_path):
    from safetensors.torch import load_file

    run = runs["rslora"]["run"]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] and (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    merge_adapter(run, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = dict(load_model("tiny-random").model.named_parameters())
    lora = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    names = [
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in lora if "lora_A" in k
    ]
    assert names
    told_apart = 0
    for name in names:
        a = lora[f"base_model.model.{name}.lora_A.weight"].double()  # (r, in)
        b = lora[f"base_model.model.{name}.lora_B.weight"].double()  # (out, r)
        w0 = base[f"{name}.weight"].detach().double()
        want = w0 + ALPHA / math.sqrt(RANK) * (b @ a)
        assert torch.allclose(merged[f"{name}.weight"].double(), want, atol=1e-6), name
        if (b @ a).abs().max() > 1e-4:  # plain LoRA's alpha / r would be a different weight
            told_apart += 1
            assert not torch.allclose(
                merged[f"{name}.weight"].double(), w0 + ALPHA / RANK * (b @ a), atol=1e-6
            )
    assert told_apart > 0


@pytest.mark.parametrize("keep", [300, 0.9])
def test_a_truncated_adapter_is_one_line_naming_it_in_every_command(runs, tmp_path, run_cli, keep):
    run = tmp_path / "cut"
    shutil.copytree(runs["lora"]["run"], run)
    weights = run / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    commands = [
        ("eval", "--model", "tiny-random", "--adapter", run, "--data", "python-stdlib", "--max-docs", "2"),
        ("merge", "--adapter", run, "--out", tmp_path / "merged"),
        ("analyze", "--tuned", run, "--base", "tiny-random", "--out", tmp_path / "a"),
        ("generate", "--model", "tiny-random", "--adapter", f"cut={run}", "--prompt", "hi"),
    ]
    for args in commands:
        code, _, err = run_cli(*args)
        lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, err)
        assert "adapter_model.safetensors is truncated or corrupt" in lines[0], (args, err)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "a").exists()


def test_an_adapter_on_another_model_of_the_same_shapes_is_named_in_a_warning(runs, tiny, tmp_path, caplog):
    from adaptlab.artifacts import check_adapter_fits

    art = resolve(runs["lora"]["run"])
    with caplog.at_level("WARNING", logger="adaptlab.artifacts"):
        check_adapter_fits(tiny.model, art, "tiny-random")
        assert caplog.text == ""
        check_adapter_fits(tiny.model, art, str(tmp_path))  # the same shapes under another name
    assert "trained on 'tiny-random' and is applied to" in caplog.text


def test_export_refuses_an_adapter_for_another_base_in_one_line(runs, tmp_path, run_cli):
    code, _, err = run_cli("export", runs["lora"]["run"], "--base", "smollm2-135m", "--out", tmp_path / "x")
    assert code == 2 and "pass --base tiny-random" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()
