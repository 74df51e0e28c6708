"""Frozen Linears held in bf16 under bf16 autocast (adaptlab.frozen_base): which weights, the same
arithmetic bit for bit (autocast would cast them to these very values), the fused LoRA path still taken,
a memory-mapped checkpoint let go, and a bf16 run that trains, resumes and saves as an fp32-base one does.

    python -m pytest -q tests/unit/test_frozen_base.py
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import adaptlab.train.build as train_build
from adaptlab import fused_lora
from adaptlab.config import MethodSpec
from adaptlab.frozen_base import adapters_in_fp32, hold_frozen_linears, load_held
from adaptlab.fused_lora import fuse_loras
from adaptlab.methods import apply_method
from adaptlab.models import load_model
from adaptlab.train import train
from tests.helpers import step_grads, tiny_config, write_corpus


def _peft(method: str = "lora", targets: str | list[str] = "all-linear") -> nn.Module:
    model = apply_method(
        copy.deepcopy(load_model("tiny-random").model),
        MethodSpec(method=method, rank=4, targets=targets),
        base_name="tiny-random",
        seed=0,
    )
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    return model


def _ids(model: nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters()}


def test_frozen_linears_are_held_and_everything_else_stays_fp32() -> None:
    model = _peft(targets=["q_proj", "v_proj"])
    n_layers = model.config.num_hidden_layers
    assert hold_frozen_linears(model) == 7 * n_layers  # every block Linear; the tied head is the embedding
    for name, dtype in _dtypes(model).items():
        linear_weight = name.endswith("proj.weight") or name.endswith("base_layer.weight")
        expected = torch.bfloat16 if linear_weight and "lora_" not in name else torch.float32
        assert dtype == expected, name
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb and emb.dtype == torch.float32
    assert hold_frozen_linears(model) == 0  # nothing left to convert


def test_dora_bases_keep_fp32_and_full_fine_tuning_holds_nothing() -> None:
    dora = _peft("dora", targets=["q_proj", "v_proj"])
    assert hold_frozen_linears(dora) == 5 * dora.config.num_hidden_layers  # k, o, gate, up, down
    for name, dtype in _dtypes(dora).items():
        if name.endswith(("q_proj.base_layer.weight", "v_proj.base_layer.weight")):
            assert dtype == torch.float32, name  # DoRA normalises by the fp32 rows of W + s B A
    full = apply_method(copy.deepcopy(load_model("tiny-random").model), MethodSpec(method="full"))
    assert hold_frozen_linears(full) == 0
    assert set(_dtypes(full).values()) == {torch.float32}


@pytest.mark.parametrize("fused", [True, False])
def test_held_base_trains_bit_for_bit_like_the_fp32_base_under_bf16_autocast(
    fused: bool, monkeypatch
) -> None:
    reference = _peft()
    held = copy.deepcopy(reference)
    if fused:
        fuse_loras(reference)
        fuse_loras(held)
    hold_frozen_linears(held)
    calls = []
    apply = fused_lora.LoRALinear.apply
    monkeypatch.setattr(fused_lora.LoRALinear, "apply", lambda *a: calls.append(a[1].dtype) or apply(*a))
    loss_a, grads_a = step_grads(reference, _ids(reference), torch.bfloat16)
    n_fused = len(calls)
    loss_b, grads_b = step_grads(held, _ids(held), torch.bfloat16)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 7 * reference.config.num_hidden_layers
    for name, g in grads_a.items():
        assert grads_b[name].dtype == torch.float32, name
        assert torch.equal(grads_b[name], g), name
    if fused:  # the fused path took every LoRA Linear, over fp32 and over held weights alike
        assert n_fused == len(calls) - n_fused == 7 * reference.config.num_hidden_layers
        assert set(calls[n_fused:]) == {torch.bfloat16}
    else:
        assert calls == []


@pytest.mark.parametrize("fused", [True, False])
def test_outside_autocast_a_held_base_computes_as_the_fp32_base_with_its_bf16_values(
    fused: bool, monkeypatch
) -> None:
    held = _peft(targets=["q_proj", "v_proj"])  # LoRA-wrapped held Linears and plain ones
    rounded = copy.deepcopy(held)
    with torch.no_grad():  # what the held values are, in an fp32 model that holds nothing
        for name, p in rounded.named_parameters():
            if not p.requires_grad and p.dim() == 2 and "embed" not in name:
                p.copy_(p.to(torch.bfloat16).float())
    if fused:
        fuse_loras(held)
        fuse_loras(rounded)
    assert hold_frozen_linears(held) > 0
    loss_a, grads_a = step_grads(rounded, _ids(rounded), None)
    calls = []
    apply = fused_lora.LoRALinear.apply
    monkeypatch.setattr(fused_lora.LoRALinear, "apply", lambda *a: calls.append(a[6]) or apply(*a))
    loss_b, grads_b = step_grads(held, _ids(held), None)
    # fused, every LoRA Linear took the fused path with its held weight widened to fp32
    assert calls == ([torch.float32] * 2 * held.config.num_hidden_layers if fused else [])
    assert loss_b.dtype == torch.float32 and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * 2 * held.config.num_hidden_layers
    for name, g in grads_a.items():
        assert torch.equal(grads_b[name], g), name


def test_a_base_loaded_held_widens_outside_autocast_too(tmp_path: Path) -> None:
    src = load_model("tiny-random").model
    src.to(torch.bfloat16).save_pretrained(tmp_path)
    load_model("tiny-random").tokenizer.save_pretrained(tmp_path)
    model = load_held(str(tmp_path), "cpu").model
    assert hold_frozen_linears(model.requires_grad_(False)) == 0  # stored in bf16: nothing to convert
    ids = _ids(model)
    with torch.no_grad():
        logits = model(ids).logits
        widened = load_model(str(tmp_path)).model(ids).logits  # the fp32 load of the same checkpoint
    assert logits.dtype == torch.float32 and torch.equal(logits, widened)


def _file_maps(path: Path) -> list[tuple[int, int]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[-1]).resolve().parent == path.resolve():
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    return spans


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_tensor_views_the_memory_mapped_checkpoint_once_held(tmp_path: Path) -> None:
    tiny = load_model("tiny-random")
    tiny.model.save_pretrained(tmp_path, safe_serialization=True)  # fp32 on disk
    tiny.tokenizer.save_pretrained(tmp_path)
    model = apply_method(load_model(str(tmp_path)).model, MethodSpec(method="lora", rank=4), seed=0)

    def in_file(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in _file_maps(tmp_path))

    tensors = [*model.parameters(), *model.buffers()]
    if not any(in_file(t) for t in tensors):
        pytest.skip("this loader copies the checkpoint into memory: nothing views the file")
    hold_frozen_linears(model)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if in_file(t)]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind", "train") == "train" and "loss" in r]


def test_a_bf16_lora_run_holds_its_base_and_trains_as_the_fp32_base_would(
    tmp_path: Path, monkeypatch
) -> None:
    corpus = write_corpus(tmp_path / "data", n_docs=12)
    seen: list[dict[str, torch.dtype]] = []
    summary = train(
        tiny_config(corpus, tmp_path / "held", precision="bf16", save_every=2),
        on_start=lambda setup: seen.append(_dtypes(setup.model)),
    )
    assert summary["precision"] == "bf16"
    assert seen[0]["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] == torch.bfloat16
    assert seen[0]["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"] == torch.float32
    adapter = load_adapter_tensors(tmp_path / "held")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}

    monkeypatch.setattr(train_build, "hold_frozen_linears", lambda model: 0)
    train(tiny_config(corpus, tmp_path / "fp32base", precision="bf16", save_every=2))
    assert _losses(tmp_path / "held") == _losses(tmp_path / "fp32base") != []
    reference = load_adapter_tensors(tmp_path / "fp32base")
    assert all(torch.equal(adapter[k], reference[k]) for k in reference)


def load_adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _saved(tmp_path: Path, dtype: torch.dtype) -> str:
    """tiny-random saved as a checkpoint stored in dtype (its weights rounded to it)."""
    tiny = load_model("tiny-random")
    out = tmp_path / str(dtype).split(".")[-1]
    copy.deepcopy(tiny.model).to(dtype).save_pretrained(out, safe_serialization=True)
    tiny.tokenizer.save_pretrained(out)
    return str(out)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_identical(a: nn.Module, b: nn.Module) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert t.dtype == tb[name].dtype and torch.equal(t, tb[name]), name


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_loading_held_equals_loading_in_fp32_then_holding(tmp_path: Path, stored: torch.dtype) -> None:
    path = _saved(tmp_path, stored)
    direct = load_held(path, "cpu").model
    linear = direct.model.layers[0].mlp.up_proj.weight
    assert linear.dtype == (torch.bfloat16 if stored == torch.bfloat16 else torch.float32)
    assert direct.get_input_embeddings().weight.dtype == torch.float32
    spec = MethodSpec(method="lora", rank=4)
    with adapters_in_fp32():
        direct = apply_method(direct, spec, base_name=path, seed=0)
    hold_frozen_linears(direct)
    widened = apply_method(load_model(path).model, spec, base_name=path, seed=0)
    hold_frozen_linears(widened)
    _assert_identical(direct, widened)  # adapters' initial values included, in fp32


def test_grpos_reference_copy_loads_a_bf16_checkpoint_held(tmp_path: Path, monkeypatch) -> None:
    """Full fine-tuning's KL reference at bf16 never holds the base whole in fp32: a bf16 checkpoint is
    loaded as stored, and the copy is the fp32 load held, tensor for tensor."""
    import adaptlab.models as models
    from adaptlab.objectives.grpo import load_reference_copy

    path = _saved(tmp_path, torch.bfloat16)
    dtypes: list[Any] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        dtypes.append(kwargs.get("dtype", torch.float32))
        return load_model(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", recording)
    copy_ = load_reference_copy(path, "cpu", "bf16")
    assert dtypes == [models.STORED]
    monkeypatch.undo()
    widened = load_model(path).model.eval().requires_grad_(False)
    assert hold_frozen_linears(widened) > 0
    _assert_identical(copy_, widened)
    assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    fp32 = load_reference_copy(path, "cpu", "fp32")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


def test_pefts_own_adapters_over_a_bf16_base_are_rounded_to_bf16(tmp_path: Path) -> None:
    """Why adapters_in_fp32 exists: without it PEFT rounds each adapter's initial values to bf16."""
    path = _saved(tmp_path, torch.bfloat16)
    spec = MethodSpec(method="lora", rank=4)
    rounded = apply_method(load_held(path, "cpu").model, spec, base_name=path, seed=0)
    exact = apply_method(load_model(path).model, spec, base_name=path, seed=0)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    a, b = dict(rounded.named_parameters())[name], dict(exact.named_parameters())[name]
    assert a.dtype == b.dtype == torch.float32 and not torch.equal(a, b)
    assert torch.equal(a, b.bfloat16().float())


def test_a_bf16_lora_run_on_a_bf16_checkpoint_trains_as_the_fp32_load_would(
    tmp_path: Path, monkeypatch
) -> None:
    path = _saved(tmp_path, torch.bfloat16)
    corpus = write_corpus(tmp_path / "data", n_docs=12)

    def config(out: str) -> Any:
        cfg = tiny_config(corpus, tmp_path / out, precision="bf16")
        cfg.model.name = path
        return cfg

    dtypes: list[torch.dtype] = []
    train(
        config("stored"),
        on_start=lambda s: dtypes.append(s.model.model.model.layers[0].mlp.up_proj.weight.dtype),
    )
    assert dtypes == [torch.bfloat16]
    monkeypatch.setattr(train_build, "load_held", lambda spec, device: load_model(spec, device=device))
    train(config("widened"))
    assert _losses(tmp_path / "stored") == _losses(tmp_path / "widened") != []
    a, b = load_adapter_tensors(tmp_path / "stored"), load_adapter_tensors(tmp_path / "widened")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
