"""The adapters `adaptlab train` writes load in vLLM's LoRA loader unchanged (checked without vLLM or a GPU).

vLLM's rules, read from its source (vllm-project/vllm) and encoded here:

- vllm/lora/peft_helper.py (PEFTHelper.from_dict / _validate_features): adapter_config.json must
  have `r`, `lora_alpha` and `target_modules`; `modules_to_save` must be empty; `use_dora` must be
  false ("vLLM does not yet support DoRA"); use_rslora is honoured (scale alpha/sqrt(r)).
- vllm/config/lora.py (LoRAConfig.max_lora_rank): the server's --max-lora-rank is one of
  1, 8, 16, 32, 64, 128, 256, 320, 512 and must be at least the adapter's r.
- vllm/lora/lora_model.py (LoRAModel.from_local_checkpoint): weights in adapter_model.safetensors;
  every key parses as `base_model.model.<module>.lora_A|lora_B.weight` (vllm/lora/utils.py
  parse_fine_tuned_lora_name) and the module's last name must be one the model supports, else
  "expected target modules in ... but received ...".
- vllm/model_executor/models/llama.py (LlamaForCausalLM): packed_modules_mapping
  qkv_proj <- q_proj, k_proj, v_proj and gate_up_proj <- gate_proj, up_proj, plus o_proj and
  down_proj; embed_tokens / lm_head only as embedding modules (lora_embedding_A/B, extra vocabulary),
  which newer vLLM is phasing out: an adapter must not carry them unless served with that support.

The command to serve a run (README, "Serve with vLLM"):

    vllm serve BASE --enable-lora --max-lora-rank 16 --lora-modules NAME=RUN/adapter
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import tiny_config, write_corpus
from safetensors import safe_open

from adaptlab.train import train

VLLM_REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VLLM_EMBEDDING_MODULES = {"embed_tokens", "lm_head"}
VLLM_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+?)\.(?:(?:lora_A|lora_B)\.weight|lora_embedding_A|lora_embedding_B|base_layer\.weight)$"
)


def vllm_problems(adapter: Path, embedding_lora: bool = False) -> list[str]:
    """What vLLM's LoRA loader would refuse in this adapter directory (empty: it loads)."""
    problems = []
    config = json.loads((adapter / "adapter_config.json").read_text())
    problems += [f"adapter_config.json lacks {k}" for k in VLLM_REQUIRED_KEYS if k not in config]
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if config.get("use_dora"):
        problems.append("DoRA is not supported")
    if config.get("bias", "none") != "none":
        problems.append("LoRA bias is not supported")
    if int(config.get("r", 0)) > max(VLLM_MAX_LORA_RANKS):
        problems.append(f"rank {config['r']} exceeds vLLM's largest --max-lora-rank")
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        return [*problems, "no adapter_model.safetensors"]
    allowed = VLLM_LLAMA_LORA_MODULES | (VLLM_EMBEDDING_MODULES if embedding_lora else set())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            match = VLLM_KEY.match(key)
            if match is None:
                problems.append(f"{key} is not a LoRA weight vLLM parses")
            elif match["module"].rsplit(".", 1)[-1] not in allowed:
                problems.append(f"{match['module']} is not a module vLLM applies LoRA to")
    return problems


def vllm_max_lora_rank(r: int) -> int:
    """The smallest --max-lora-rank choice that serves rank r."""
    return next(choice for choice in VLLM_MAX_LORA_RANKS if choice >= r)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("vllm") / "data", 6)


def test_a_trained_adapter_loads_in_vllm(corpus, tmp_path):
    # rsLoRA on every linear layer: the widest set of modules and the scaling vLLM reads from the config
    train(tiny_config(corpus, tmp_path / "run", "lora", steps=1, rank=16, rslora=True, targets="all-linear"))
    adapter = tmp_path / "run" / "adapter"
    assert vllm_problems(adapter) == []
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert vllm_max_lora_rank(config["r"]) == 16  # the --max-lora-rank the README command uses


def test_the_rules_catch_what_vllm_refuses(corpus, tmp_path):
    train(tiny_config(corpus, tmp_path / "dora", "dora", steps=1))
    assert "DoRA is not supported" in vllm_problems(tmp_path / "dora" / "adapter")
    assert vllm_max_lora_rank(4) == 8 and vllm_max_lora_rank(200) == 256


def test_embedding_lora_needs_the_embedding_flag(tmp_path, tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(tiny.model), LoraConfig(r=8, target_modules=["q_proj", "embed_tokens"])
    )
    model.save_pretrained(str(tmp_path / "adapter"))
    problems = vllm_problems(tmp_path / "adapter")
    assert any("embed_tokens" in p for p in problems)
