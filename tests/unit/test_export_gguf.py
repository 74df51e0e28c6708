"""`adaptlab export --format gguf`: tensors read back with gguf's own reader equal the source weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adaptlab.cli import main
from adaptlab.errors import UserError
from adaptlab.export import Q8_BOUND_STEPS, export, modelfile, permute
from adaptlab.models import local_dir


def hf_weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_file(str(model_dir / "model.safetensors")).items()}


def read_back(path: Path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(str(path))
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(t.data.shape[0], -1)
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        else np.asarray(t.data, dtype=np.float32)
        for t in reader.tensors
    }
    return reader, tensors


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory) -> tuple[Path, object, gguf.GGUFReader, dict[str, np.ndarray]]:
    """tiny-random exported once (f16, with a Modelfile) and read back once (GGUFReader is slow on
    a 49k-token vocabulary)."""
    out = tmp_path_factory.mktemp("gguf") / "f16"
    report = export("tiny-random", out, quant="f16", ollama=True)
    return (out, report, *read_back(out / "model-f16.gguf"))


def test_f16_model_reads_back_exactly_with_llama_cpp_names(tiny_f16):
    out, report, reader, tensors = tiny_f16
    assert report.exact and report.max_abs_err == 0.0
    source = hf_weights(local_dir("tiny-random"))
    q = permute(source["model.layers.0.self_attn.q_proj.weight"], 4)
    k = permute(source["model.layers.1.self_attn.k_proj.weight"], 2)
    pairs = {
        "token_embd.weight": source["model.embed_tokens.weight"],
        "blk.0.attn_q.weight": q,
        "blk.1.attn_k.weight": k,
        "blk.1.ffn_down.weight": source["model.layers.1.mlp.down_proj.weight"],
        "output_norm.weight": source["model.norm.weight"],
    }
    for name, weights in pairs.items():
        expected = weights.astype(np.float16).astype(np.float32) if weights.ndim == 2 else weights
        assert np.array_equal(tensors[name], expected), name
    assert len(tensors) == 2 * 9 + 2  # tied embeddings: no output.weight, as llama.cpp writes it
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "llama.attention.head_count_kv") == 2
    assert (out / "Modelfile").read_text().splitlines() == [
        "FROM ./model-f16.gguf",
        'PARAMETER stop "<|im_end|>"',
    ]


def test_transformers_loads_the_export_with_the_same_logits(tiny_f16, tiny):
    from transformers import AutoModelForCausalLM

    out = tiny_f16[0]
    loaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model-f16.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 400, 2000, 77, 9000, 12]])
    with torch.no_grad():
        want, got = tiny.model(ids).logits, loaded(ids).logits
    assert torch.allclose(want, got, atol=2e-3), (want - got).abs().max()


def test_q8_0_error_is_reported_and_bounded(tmp_path, tiny):
    # a LoRA adapter (no tokenizer to write, so it is quick; the full smollm2 model in q8_0 is an
    # integration test): lora_a rows (64 values) go to Q8_0, lora_b rows (r = 4 values) fall back to F16
    report = export(make_adapter(tmp_path, tiny), tmp_path / "q8", quant="q8_0")
    q8 = [c for c in report.checks if c.dtype == "Q8_0"]
    assert {c.name.rsplit(".", 1)[-1] for c in q8} == {"lora_a"} and len(q8) == 2 * 3
    assert {c.dtype for c in report.checks if c.name.endswith("lora_b")} == {"F16"}
    assert all(c.max_err_in_steps <= Q8_BOUND_STEPS for c in q8)
    assert report.max_abs_err > 0 and report.max_rel_err < 1 / 127


def make_adapter(tmp_path: Path, tiny, **lora) -> Path:
    """A PEFT LoRA adapter on tiny-random with non-zero B (as after training)."""
    import copy

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=lora.pop("targets", ["q_proj", "k_proj", "v_proj"]), **lora
    )
    model = get_peft_model(copy.deepcopy(tiny.model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    path = tmp_path / "adapter"
    model.save_pretrained(str(path))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "tiny-random"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_lora_adapter_as_gguf_lora(tmp_path, tiny):
    adapter = make_adapter(tmp_path, tiny)
    report = export(adapter, tmp_path / "out", quant="f16")
    assert report.kind == "adapter" and report.exact
    reader, tensors = read_back(tmp_path / "out" / "adapter-f16.gguf")
    assert field_value(reader, "general.type") == "adapter"
    assert field_value(reader, "adapter.type") == "lora"
    assert field_value(reader, "adapter.lora.alpha") == 8.0
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].numpy()
    b = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"], a.astype(np.float16).astype(np.float32))
    want_b = permute(b, 4).astype(np.float16).astype(np.float32)  # rows permuted like the base's attn_q
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], want_b)
    assert len(tensors) == 2 * 3 * 2
    assert (
        modelfile("base-f16.gguf", "adapter-f16.gguf", None)
        == "FROM ./base-f16.gguf\nADAPTER ./adapter-f16.gguf\n"
    )


def test_rslora_alpha_is_rescaled_and_dora_or_embeddings_are_refused(tmp_path, tiny):
    rs = make_adapter(tmp_path / "rs", tiny, use_rslora=True)
    export(rs, tmp_path / "rs-out")
    reader = gguf.GGUFReader(str(tmp_path / "rs-out" / "adapter-f16.gguf"))
    assert field_value(reader, "adapter.lora.alpha") == pytest.approx(8 * math.sqrt(4))
    dora = make_adapter(tmp_path / "dora", tiny, use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        export(dora, tmp_path / "dora-out")
    emb = make_adapter(tmp_path / "emb", tiny, targets=["q_proj", "embed_tokens"])
    with pytest.raises(UserError, match="embed"):
        export(emb, tmp_path / "emb-out")
    assert not (tmp_path / "dora-out").exists()


def test_unsupported_architecture_is_one_line(tmp_path, capsys):
    model = tmp_path / "qwen"
    model.mkdir()
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 1}
    (model / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, str(model / "model.safetensors"))
    assert main(["export", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Qwen2ForCausalLM" in err[0]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_a_model_with_non_finite_weights_is_one_line(tmp_path, capsys, quant):
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "nan-model"
    shutil.copytree(local_dir("tiny-random"), model)
    weights = load_file(str(model / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    weights[key][0, 0] = math.nan  # Q8_0 would carry it silently: its error check sees NaN as no error
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(["export", str(model), "--quant", quant, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{model} holds non-finite weights" in err[0] and "blk.1.ffn_down" in err[0], err
    assert not (tmp_path / "out").exists()  # the refused GGUF, written under a temp name, is gone with it
