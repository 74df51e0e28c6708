"""Intruder mitigation on tiny-random: lambda = 1 is the identity (bit for bit), lambda = 0 removes the
intruder triplets of the SVD, a synthetic intruder goes and nothing else changes, parity with PEFT's
`reduce_intruder_dimension`, and the CLI.

    python -m pytest -q tests/unit/test_mitigate.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import undeclared_outputs
from safetensors.torch import load_file

from adaptlab.analysis import analyze, layer_updates
from adaptlab.mitigate import find_intruders, mitigate

# (128, 64): tall, so the output space has directions outside W0's column space
INTRUDER_LAYER = "model.layers.1.mlp.gate_proj"
KEY = "base_model.model." + INTRUDER_LAYER


def _adapter(tiny: Any, out: Path, intruder: bool = True, **kwargs: Any) -> Path:
    """A random LoRA (r=4, all-linear) on tiny-random; with `intruder`, one rank of the gate_proj of
    layer 1 writes a strong new direction orthogonal to W0's column space."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)
    model = get_peft_model(copy.deepcopy(tiny.model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)
        if intruder:
            layer = model.base_model.model.get_submodule(INTRUDER_LAYER)
            w0 = layer.base_layer.weight
            u_full, s0, _ = torch.linalg.svd(w0, full_matrices=True)
            v = torch.randn(w0.shape[1], generator=torch.Generator().manual_seed(1))
            layer.lora_A["default"].weight[0] = v / v.norm()
            layer.lora_B["default"].weight[:, 0] = 2.0 * s0[0] * u_full[:, 100] / layer.scaling["default"]
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _adapter(tiny, tmp_path_factory.mktemp("mit") / "adapter")


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {u.name: u.dw.double() for u in layer_updates("tiny-random", adapter_dir).layers}


def test_lambda_one_copies_the_adapter_bit_for_bit(adapter: Path, tmp_path: Path) -> None:
    report = mitigate(adapter, 1.0, tmp_path / "m", base="tiny-random")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (adapter / name).read_bytes()
    assert report["totals"]["intruders"] >= 1  # found, but kept whole


@pytest.mark.parametrize("rank_mode", ["exact", "keep"])
def test_lambda_zero_removes_the_intruder_triplets_of_the_svd(
    adapter: Path, tmp_path: Path, rank_mode: str
) -> None:
    report = mitigate(adapter, 0.0, tmp_path / "m", base="tiny-random", rank_mode=rank_mode)
    before = {u.name: u for u in layer_updates("tiny-random", adapter).layers}
    after = _deltas(tmp_path / "m")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows[INTRUDER_LAYER]["intruders"] >= 1
    for name, row in rows.items():
        u = before[name]
        w = (u.w0 + u.dw).double()
        uu, s, vh = torch.linalg.svd(w, full_matrices=False)
        keep = [i for i in range(s.numel()) if i not in row["index"]]
        expected = (uu[:, keep] * s[keep]) @ vh[keep]  # W with exactly the intruder triplets removed
        got = u.w0.double() + after[name]
        tol = 1e-5 * float(s[0])
        if rank_mode == "keep":  # rank r again: the truncation error is reported and bounds the gap
            tol += row["truncation_error"] * float(torch.linalg.matrix_norm(after[name])) * 1.01
        assert float((got - expected).abs().max()) <= tol, name
        if row["index"] and rank_mode == "exact":
            # the removed left singular vectors are orthogonal to the new W
            assert float((uu[:, row["index"]].T @ got).abs().max()) < 1e-4 * float(s[0])


def test_synthetic_intruder_is_removed_and_nothing_else_changes(adapter: Path, tmp_path: Path) -> None:
    before = analyze("tiny-random", adapter)
    by_name = {r["name"]: r for r in before["layers"]}
    assert by_name[INTRUDER_LAYER]["intruders"] >= 1
    touched = {n for n, r in by_name.items() if r["intruders"]}

    mitigate(adapter, 0.0, tmp_path / "m", base="tiny-random")
    after = {r["name"]: r for r in analyze("tiny-random", tmp_path / "m")["layers"]}
    assert after[INTRUDER_LAYER]["intruders"] == 0
    old, new = (
        load_file(str(adapter / "adapter_model.safetensors")),
        load_file(str(tmp_path / "m" / "adapter_model.safetensors")),
    )
    assert set(old) == set(new)
    for key, tensor in old.items():
        layer = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if layer in touched:  # exact mode keeps the original r columns, bit for bit, and appends
            assert torch.equal(new[key][:4] if ".lora_A." in key else new[key][:, :4], tensor)
        else:
            assert torch.equal(new[key], tensor), key
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"][INTRUDER_LAYER] == 4 + by_name[INTRUDER_LAYER]["intruders"]


def test_adapter_without_intruders_is_unchanged(tiny: Any, tmp_path: Path) -> None:
    plain = _adapter(tiny, tmp_path / "plain", intruder=False)
    report = mitigate(plain, 0.5, tmp_path / "m", base="tiny-random")
    assert report["totals"]["intruders"] == 0
    old, new = (
        load_file(str(plain / "adapter_model.safetensors")),
        load_file(str(tmp_path / "m" / "adapter_model.safetensors")),
    )
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_mitigated_adapter_loads_in_peft_with_the_expected_logits(
    tiny: Any, adapter: Path, tmp_path: Path
) -> None:
    """The written directory is a plain PEFT adapter: its forward equals W0 + dW' computed here."""
    from peft import PeftModel

    lam = 0.3
    mitigate(adapter, lam, tmp_path / "m", base="tiny-random")
    model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(tmp_path / "m")).merge_and_unload()
    u = {x.name: x for x in layer_updates("tiny-random", adapter).layers}[INTRUDER_LAYER]
    found = find_intruders(u.w0, u.dw)
    want = u.w0.double() + u.dw.double() - (1 - lam) * (found.u * found.s) @ found.vh
    got = model.get_submodule(INTRUDER_LAYER).weight.double()
    assert float((got - want).abs().max()) < 1e-5


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_parity_with_peft_reduce_intruder_dimension(
    tiny: Any, adapter: Path, tmp_path: Path, lam: float
) -> None:
    """rank_mode=keep is PEFT's algorithm: the same dW' per layer within 1e-4 of ||dW'|| (PEFT's SVDs run
    in float32, ours in float64). rank_mode=exact differs from PEFT by PEFT's truncation error alone."""
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model = PeftModel.from_pretrained(copy.deepcopy(tiny.model), str(adapter))
    reduce_intruder_dimension(model, mitigation_lambda=lam, logging_sink=None)
    model.save_pretrained(tmp_path / "peft", selected_adapters=["intruder_reduced"])
    theirs = _deltas(tmp_path / "peft" / "intruder_reduced")
    keep = mitigate(adapter, lam, tmp_path / "keep", base="tiny-random", rank_mode="keep")
    exact = mitigate(adapter, lam, tmp_path / "exact", base="tiny-random")
    ours_keep, ours_exact = _deltas(tmp_path / "keep"), _deltas(tmp_path / "exact")
    errors = {r["name"]: r["truncation_error"] for r in keep["layers"]}
    assert {r["name"]: r["index"] for r in keep["layers"]} == {r["name"]: r["index"] for r in exact["layers"]}
    for name, d in theirs.items():
        scale = float(torch.linalg.matrix_norm(ours_exact[name]))
        assert float(torch.linalg.matrix_norm(d - ours_keep[name])) <= 1e-4 * scale, name
        gap = float(torch.linalg.matrix_norm(d - ours_exact[name])) / scale
        assert gap <= errors[name] * 1.01 + 1e-4, name
    assert errors[INTRUDER_LAYER] > 0  # PEFT's rank-r form loses part of dW' where intruders were


def test_refuses_dora_and_bad_lambda(tiny: Any, tmp_path: Path) -> None:
    from adaptlab.errors import UserError

    dora = _adapter(tiny, tmp_path / "dora", intruder=False, use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        mitigate(dora, 0.5, tmp_path / "m", base="tiny-random")
    with pytest.raises(UserError, match="between 0 and 1"):
        mitigate(dora, 1.5, tmp_path / "m", base="tiny-random")


def test_cli_mitigate_writes_a_new_adapter_and_refuses_foreign_folders(
    run_cli: Any, adapter: Path, tmp_path: Path
) -> None:
    code, out, _ = run_cli(
        "analyze", "--tuned", adapter, "--base", "tiny-random", "--mitigate", "0.5", "--out", tmp_path / "m"
    )
    assert code == 0 and "intruder directions" in out
    assert (tmp_path / "m" / "adapter_model.safetensors").exists() and (
        tmp_path / "m" / "mitigation.json"
    ).exists()
    assert undeclared_outputs(tmp_path / "m", "mitigated adapter") == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli("analyze", "--tuned", adapter, "--mitigate", "0.5", "--out", tmp_path / "mine")
    assert code == 2 and "did not write" in err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli("analyze", "--tuned", adapter, "--mitigate", "1.5")
    assert code == 2 and "--mitigate" in err


def test_cli_sweep_learning_vs_forgetting(
    run_cli: Any, adapter: Path, tmp_path: Path, shared_data: Path
) -> None:
    from helpers import write_corpus

    corpus = write_corpus(tmp_path / "data", n_docs=30)
    general = shared_data / "general" / "wordnet_glosses.jsonl"
    code, out, _ = run_cli(
        "analyze",
        "--tuned",
        adapter,
        "--base",
        "tiny-random",
        "--mitigate",
        "sweep",
        "--lambdas",
        "0,1",
        "--data",
        corpus,
        "--general",
        general,
        "--eval-docs",
        "3",
        "--out",
        tmp_path / "sw",
    )
    assert code == 0, out
    result = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [p["lambda"] for p in result["points"]] == [0.0, 1.0]
    assert all(p["forgetting_metric"] == "general_nll" for p in result["points"])
    assert (tmp_path / "sw" / "sweep.png").exists() and (
        tmp_path / "sw" / "lambda-0" / "adapter_config.json"
    ).exists()
    # lambda 1 is the original adapter: its figures differ from lambda 0's (the intruder was removed)
    assert result["points"][0]["learning"] != result["points"][1]["learning"]
