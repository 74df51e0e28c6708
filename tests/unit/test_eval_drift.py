"""Drift KL(base || tuned): zero against itself, never negative, growing with the adapter's scale."""

from __future__ import annotations

import copy

import pytest
import torch

from adaptlab.evaluate import drift, evaluate
from adaptlab.evaluate.perplexity import encode_documents

GENERAL = [
    "A kettle is a pot for boiling water, with a lid, a spout and a handle.",
    "Autumn is the season when leaves change colour and fall from the trees.",
    "To make friends in a new town, join a club, say hello to neighbours and be patient.",
]


@pytest.fixture(scope="module")
def peft_tiny(tiny):
    """tiny-random with a non-zero LoRA adapter (a copy: the shared fixture stays untouched)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(tiny.model), config)
    model.eval()
    return model


def _scale_adapter(model, factor: float) -> dict[str, torch.Tensor]:
    saved = {}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            saved[name] = p.detach().clone()
            p.data.mul_(factor)
    return saved


def _restore(model, saved: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in saved:
            p.data.copy_(saved[name])


def _kl(model, tokenizer, base=None) -> float:
    seqs, masks, _ = encode_documents(GENERAL, tokenizer, 64)
    scores = drift.drift_scores(model, tokenizer, seqs, masks, base=base, seq_len=64, batch_size=2)
    return float(scores.kl.sum() / scores.tokens.sum())


def test_drift_of_a_model_against_itself_is_zero(tiny, peft_tiny):
    assert _kl(tiny.model, tiny.tokenizer, base=tiny.model) == 0.0
    saved = _scale_adapter(peft_tiny, 0.0)  # adapter that adds nothing: tuned == base exactly
    try:
        assert _kl(peft_tiny, tiny.tokenizer) == 0.0
    finally:
        _restore(peft_tiny, saved)


def test_drift_is_positive_and_grows_with_adapter_scale(tiny, peft_tiny):
    values = []
    for factor in (0.5, 1.0, 2.0):
        saved = _scale_adapter(peft_tiny, factor)
        try:
            values.append(_kl(peft_tiny, tiny.tokenizer))
        finally:
            _restore(peft_tiny, saved)
    assert values[0] > 0.0
    assert values[0] < values[1] < values[2]


def test_peft_one_model_path_equals_separate_base(tiny, peft_tiny):
    """Adapters disabled inside the same object give the same KL as the base loaded separately."""
    assert _kl(peft_tiny, tiny.tokenizer) == pytest.approx(
        _kl(peft_tiny, tiny.tokenizer, base=tiny.model), rel=1e-5
    )


def test_sampled_drift_and_nll_sections(tiny, peft_tiny):
    prompts = ["How do I boil an egg?", "Why is the sky blue?"]
    result = evaluate(
        peft_tiny,
        tiny.tokenizer,
        general_docs=GENERAL,
        drift_kl=True,
        drift_prompts=prompts,
        drift_new_tokens=6,
        seq_len=64,
        n_resamples=200,
    )
    d = result["drift"]
    assert d["source"] == "sampled" and d["docs"] == 2 and 2 <= d["tokens"] <= 12
    assert d["kl"] > 0 and d["ci95"][0] <= d["kl"] <= d["ci95"][1]
    g = result["general"]
    assert g["delta"]["nll"] == pytest.approx(g["nll"] - g["base"]["nll"])
    assert g["tokens"] == g["base"]["tokens"]
    # the same seed samples the same text
    again = drift.sample_from_base(peft_tiny, tiny.tokenizer, prompts, 6, seed=0)
    assert again == drift.sample_from_base(peft_tiny, tiny.tokenizer, prompts, 6, seed=0)


def test_drift_needs_a_base(tiny):
    from adaptlab.errors import UserError

    with pytest.raises(UserError, match="--drift"):
        evaluate(tiny.model, tiny.tokenizer, drift_kl=True)
