"""Weight-update analysis on tiny-random: intruder detection, the paper's reference definition,
LoRA == merged full model, outputs and CLI errors.

    python -m pytest -q tests/unit/test_analysis.py
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import undeclared_outputs

from adaptlab.analysis import LayerUpdate, analyze, layer_stats, layer_updates

# (128, 64): tall, so the output space has directions outside W0's column space
INTRUDER_LAYER = "model.layers.1.mlp.gate_proj"


def reference_intruders(w0: torch.Tensor, dw: torch.Tensor, k: int, eps: float) -> tuple[int, torch.Tensor]:
    """The paper's definition, written plainly: full SVDs, top-k tuned left vectors vs all base left vectors."""
    u_base, _, _ = torch.linalg.svd(w0.float(), full_matrices=False)
    u_tuned, _, _ = torch.linalg.svd((w0 + dw).float(), full_matrices=False)
    max_cos = []
    for j in range(min(k, u_tuned.shape[1])):
        cosines = [abs(float(u_tuned[:, j] @ u_base[:, i])) for i in range(u_base.shape[1])]
        max_cos.append(max(cosines))
    return sum(c < eps for c in max_cos), torch.tensor(max_cos)


def _save_perturbed(model: Any, out: Path, noise: float, seed: int) -> Path:
    """Add relative Gaussian noise to every Linear weight (not the head) and save as an HF dir."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                w.add_(torch.randn(w.shape, generator=gen) * noise * w.norm() / w.numel() ** 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _lora(tiny: Any, out: Path, seed: int = 0, **kwargs: Any) -> tuple[Path, Path]:
    """Save a random-B LoRA adapter on tiny-random and the equivalent merged full model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kwargs)
    peft_model = get_peft_model(copy.deepcopy(tiny.model), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # updates of a realistic size next to W0
            if "lora_magnitude_vector" in name:  # DoRA: move the magnitudes away from ||W0 + sBA||
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(out / "adapter")
    peft_model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def lora_pair(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _lora(tiny, tmp_path_factory.mktemp("lora"))


def test_new_orthogonal_direction_is_an_intruder_in_that_layer_only(tiny: Any, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny.model)
    gate = model.get_submodule(INTRUDER_LAYER).weight  # (out=128, in=64)
    with torch.no_grad():
        u_base, s_base, _ = torch.linalg.svd(gate, full_matrices=True)
        u_new = u_base[:, 100]  # orthogonal to every column of W0 (rank 64 < 128)
        v = torch.randn(gate.shape[1], generator=torch.Generator().manual_seed(1))
        v = v / v.norm()
        gate.add_(2.0 * s_base[0] * torch.outer(u_new, v))
    tuned = _save_perturbed(model, tmp_path / "tuned", noise=1e-3, seed=2)  # small noise everywhere

    result = analyze("tiny-random", tuned)
    by_name = {r["name"]: r for r in result["layers"]}
    assert len(by_name) == 14
    assert by_name[INTRUDER_LAYER]["intruders"] == 1
    assert by_name[INTRUDER_LAYER]["max_cos"][0] < 0.25  # the top tuned direction is mostly the new one
    assert {n for n, r in by_name.items() if r["intruders"]} == {INTRUDER_LAYER}
    assert result["totals"]["intruders"] == 1
    assert result["totals"]["by_module_type"]["gate"]["intruders"] == 1
    assert result["totals"]["by_layer"]["1"]["intruders"] == 1
    assert result["totals"]["by_layer"]["0"]["intruders"] == 0


@pytest.mark.parametrize("shape", [(48, 48), (24, 72), (96, 32)])
def test_small_random_perturbation_has_no_intruders(shape: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = []
    for i in range(3):
        w0 = torch.randn(shape, generator=gen)
        dw = 1e-3 * torch.randn(shape, generator=gen) * w0.norm() / w0.numel() ** 0.5
        layers.append(LayerUpdate(f"model.layers.{i}.mlp.up_proj", w0, dw))
    rows, _ = layer_stats(layers)
    assert [r["intruders"] for r in rows] == [0, 0, 0]
    assert all(min(r["max_cos"]) > 0.9 for r in rows)


def _fixed_pairs() -> list[LayerUpdate]:
    """Seeded matrices of three shapes (several per shape, so batching is exercised) with low-rank updates
    from weak to strong, so some layers have no intruders and others several."""
    gen = torch.Generator().manual_seed(1234)
    layers = []
    for shape in [(40, 40), (24, 56), (72, 32)]:
        for j, strength in enumerate([0.05, 0.5, 2.0, 6.0]):
            w0 = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            b, a = torch.randn(shape[0], 4, generator=gen), torch.randn(4, shape[1], generator=gen)
            scale = strength * torch.linalg.matrix_norm(w0, ord=2) / torch.linalg.matrix_norm(b @ a, ord=2)
            dw = scale * (b @ a)  # rank 4, spectral norm = strength * ||W0||_2
            layers.append(LayerUpdate(f"model.layers.{j}.self_attn.{shape[0]}x{shape[1]}", w0, dw))
    return layers


@pytest.mark.parametrize(("k", "eps"), [(10, 0.5), (5, 0.3), (20, 0.7)])
def test_counts_equal_reference_definition(k: int, eps: float) -> None:
    layers = _fixed_pairs()
    rows, _ = layer_stats(layers, k=k, eps=eps)
    expected = [reference_intruders(layer.w0, layer.dw, k, eps) for layer in layers]
    assert [r["intruders"] for r in rows] == [count for count, _ in expected]
    for row, (_, max_cos) in zip(rows, expected):
        assert torch.allclose(torch.tensor(row["max_cos"]), max_cos, atol=1e-4)
    counts = [r["intruders"] for r in rows]
    assert 0 in counts and max(counts) >= 2  # the fixture covers both cases


def test_update_norms_and_ranks_equal_reference() -> None:
    layers = _fixed_pairs()
    rows, _ = layer_stats(layers)
    for row, layer in zip(rows, layers):
        s = torch.linalg.svdvals(layer.dw.double())
        energy = (s**2).cumsum(0) / (s**2).sum()
        assert row["effective_rank"] == int((energy < 0.9).sum()) + 1
        assert row["effective_rank"] <= 4  # rank-4 updates
        assert row["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-4)
        assert row["update_norm"] == pytest.approx(float(layer.dw.norm()), rel=1e-5)
        assert row["rel_update_norm"] == pytest.approx(float(layer.dw.norm() / layer.w0.norm()), rel=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"use_rslora": True},
        {"use_dora": True},
        {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3, "layers.1.self_attn.v_proj": 32}},
    ],
    ids=["lora", "rslora", "dora", "patterns"],
)
def test_adapter_and_merged_model_give_same_update(
    tiny: Any, tmp_path: Path, variant: dict[str, Any], lora_pair: tuple[Path, Path]
) -> None:
    adapter, merged = lora_pair if not variant else _lora(tiny, tmp_path, seed=3, **variant)
    from_adapter = {layer.name: layer.dw for layer in layer_updates("tiny-random", adapter).layers}
    from_merged = {layer.name: layer.dw for layer in layer_updates("tiny-random", merged).layers}
    assert from_adapter.keys() == from_merged.keys() and len(from_adapter) == 14
    for name, dw in from_adapter.items():
        # merged weights are (W0 + dW) rounded to fp32, so dW agrees to fp32 rounding of W0
        assert torch.linalg.norm(dw - from_merged[name]) <= 1e-5 * torch.linalg.norm(dw), name
    a, m = analyze("tiny-random", adapter), analyze("tiny-random", merged)
    assert [r["intruders"] for r in a["layers"]] == [r["intruders"] for r in m["layers"]]
    assert [r["effective_rank"] for r in a["layers"]] == [r["effective_rank"] for r in m["layers"]]
    for ra, rm in zip(a["layers"], m["layers"]):
        assert ra["max_cos"] == pytest.approx(rm["max_cos"], abs=1e-4)
    assert a["kind"] == "adapter" and m["kind"] == "model" and m["method"] == "full"


def test_scaling_follows_the_adapter_config(tiny: Any, tmp_path: Path) -> None:
    """rsLoRA scales by alpha/sqrt(r), plain LoRA by alpha/r: same A, B give dW ratios of sqrt(r)."""
    plain, _ = _lora(tiny, tmp_path / "plain", seed=5)
    rs, _ = _lora(tiny, tmp_path / "rs", seed=5, use_rslora=True)
    dw_plain = {x.name: x.dw for x in layer_updates("tiny-random", plain).layers}
    dw_rs = {x.name: x.dw for x in layer_updates("tiny-random", rs).layers}
    for name in dw_plain:
        assert torch.allclose(dw_rs[name], dw_plain[name] * 2.0, rtol=1e-5, atol=1e-7)  # sqrt(4) = 2


def test_unchanged_layer_has_no_update(tiny: Any, tmp_path: Path) -> None:
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.q_proj").weight.mul_(1.01)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    rows = {r["name"]: r for r in analyze("tiny-random", tmp_path / "m")["layers"]}
    frozen = rows["model.layers.1.mlp.down_proj"]
    assert frozen["update_norm"] == 0 and frozen["effective_rank"] == 0 and frozen["intruders"] == 0
    changed = rows["model.layers.0.self_attn.q_proj"]
    assert changed["rel_update_norm"] == pytest.approx(0.01, rel=1e-3)
    assert changed["intruders"] == 0 and changed["effective_rank"] >= 1


def test_outputs_and_eps_sweep(lora_pair: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, _ = lora_pair
    result = analyze("tiny-random", adapter, k=6, eps=0.45, out_dir=tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["k"] == 6 and saved["eps"] == 0.45 and saved["layers"] == result["layers"]
    required = {"name", "module_type", "layer", "shape", "rel_update_norm", "effective_rank", "stable_rank"}
    assert required | {"intruders", "update_norm", "max_cos"} <= set(saved["layers"][0])
    assert saved["layers"][0]["name"] == "model.layers.0.self_attn.q_proj"
    assert all(len(r["max_cos"]) == 6 for r in saved["layers"])
    assert set(saved["totals"]["by_module_type"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    sweep = [v["intruders"] for v in saved["eps_sweep"].values()]
    assert sweep == sorted(sweep)  # more intruders as eps grows
    assert saved["eps_sweep"]["0.45"]["intruders"] == saved["totals"]["intruders"]
    assert "tiny-random" in saved["base_note"]
    for png in saved["heatmaps"]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_and_json(run_cli: Any, lora_pair: tuple[Path, Path], tmp_path: Path) -> None:
    adapter, _ = lora_pair
    code, out, err = run_cli("analyze", "--tuned", adapter, "--base", "tiny-random", "--out", tmp_path / "a")
    assert code == 0, err
    assert "all" in out and "eps sweep" in out and (tmp_path / "a" / "intruders.png").exists()
    assert undeclared_outputs(tmp_path / "a", "analysis") == []
    code, out, err = run_cli("analyze", "--tuned", adapter, "--json", "--k", "3", "--out", tmp_path / "b")
    assert code == 0, err
    printed = json.loads(out)  # base defaults to the one the adapter records
    assert printed["k"] == 3 and len(printed["layers"]) == 14
    assert printed == json.loads((tmp_path / "b" / "analysis.json").read_text())


def test_run_directory_defaults(tiny: Any, tmp_path: Path, run_cli: Any) -> None:
    run = tmp_path / "run"
    _lora(tiny, run, seed=7)
    (run / "merged").rename(tmp_path / "merged")
    (run / "config.yaml").write_text("model:\n  name: tiny-random\n")
    (run / "summary.json").write_text(json.dumps({"method": "qlora", "base_model": "tiny-random"}))
    code, out, err = run_cli("analyze", "--tuned", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "qlora" and "QLoRA" in result["base_note"]
    assert (run / "analysis" / "analysis.json").exists()


def _one_error_line(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_cli_missing_path(run_cli: Any, tmp_path: Path) -> None:
    code, _, err = run_cli("analyze", "--tuned", tmp_path / "nope", "--base", "tiny-random")
    assert "no such file or directory" in _one_error_line(code, err)


def test_cli_artifacts_for_another_base(run_cli: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    other = AutoModelForCausalLM.from_config(config)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    peft_model = get_peft_model(other, LoraConfig(r=2, target_modules="all-linear"))
    peft_model.save_pretrained(tmp_path / "other-adapter")
    code, _, err = run_cli("analyze", "--tuned", tmp_path / "other-adapter", "--base", "tiny-random")
    assert "does not fit base" in _one_error_line(code, err)
    code, _, err = run_cli("analyze", "--tuned", tmp_path / "other", "--base", "tiny-random")
    assert "does not fit base" in _one_error_line(code, err)
    code, _, err = run_cli("analyze", "--tuned", tmp_path / "other")  # a bare model records no base
    assert "--base" in _one_error_line(code, err)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--rank-mode", "keep"], "--rank-mode"),
        (["--lambdas", "0,1"], "--lambdas"),
        (["--mitigate", "0.5", "--eval-docs", "4"], "--eval-docs"),
        (["--mitigate", "0.5", "--general", "python-stdlib"], "--general"),
    ],
)
def test_a_mitigation_flag_without_its_mitigation_is_one_line(run_cli, tmp_path, args, flag):
    code, _, err = run_cli("analyze", "--tuned", tmp_path / "any", *args)
    assert code == 2 and f"{flag} applies to --mitigate" in err and len(err.strip().splitlines()) == 1, err


def test_cli_a_model_with_non_finite_weights_is_one_line(run_cli: Any, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from adaptlab.models import local_dir

    model = tmp_path / "nan-model"
    shutil.copytree(local_dir("tiny-random"), model)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][2, 5] = math.inf
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("analyze", "--tuned", model, "--base", "tiny-random", "--out", tmp_path / "a")
    line = _one_error_line(code, err)
    assert f"{model}/model.safetensors holds non-finite weights" in line and "q_proj.weight" in line
    assert not (tmp_path / "a").exists()
