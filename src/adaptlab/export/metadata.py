"""GGUF metadata of a llama model: its hyperparameters and its tokenizer (gpt2 BPE, merges, special ids,
chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptlab.export.llama import head_counts, rope_params

SMOLLM2_BASES = ("smollm2-135m", "tiny-random")
"""Embedded bases with the SmolLM2 tokenizer, whose llama.cpp pre-tokenizer is `smollm`."""


def pre_tokenizer(base: str | None) -> str:
    return "smollm" if base in SMOLLM2_BASES else "default"


def tokenizer_metadata(writer: Any, tok_dir: Path, config: dict[str, Any], pre: str) -> None:
    """tokenizer.ggml.*: the BPE vocabulary (gpt2 model), token types, merges, special ids, chat template."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab_size = int(config.get("vocab_size") or len(tok))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not special.chat_template and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = bool(getattr(tok, "add_bos_token", False))
    special.add_to_gguf(writer)
    writer.add_add_space_prefix(False)  # byte-level BPE: spaces are part of the tokens


def model_metadata(writer: Any, config: dict[str, Any], quant: str) -> None:
    import gguf

    n_head, n_kv = head_counts(config)
    hidden = int(config["hidden_size"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(rope_params(config).get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // n_head))
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
