"""Per-document numbers and the target-text KL kept by evaluate() for paired comparisons."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptlab.evaluate import evaluate

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The river rose after three days of rain and the bridge was closed.",
    "import os\nprint(os.getcwd())\n",
]


def _tuned(tiny):
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_per_doc_numbers_add_up_to_the_figures_and_kl_is_measured_both_ways(tiny) -> None:
    torch.manual_seed(0)
    tuned = _tuned(tiny)
    ev = evaluate(
        tuned,
        tiny.tokenizer,
        tiny.model,
        target_docs=DOCS,
        general_docs=DOCS[1:],
        per_doc=True,
        target_kl=True,
        seq_len=32,
    )
    t = ev["target"]["per_doc"]
    assert len(t["nll"]) == len(t["base_nll"]) == len(t["tokens"]) == len(DOCS)
    assert sum(t["nll"]) / sum(t["tokens"]) == pytest.approx(ev["target"]["nll"])
    assert sum(t["base_nll"]) / sum(t["tokens"]) == pytest.approx(ev["target"]["base"]["nll"])
    assert len(ev["general"]["per_doc"]["nll"]) == 2
    k = ev["target_kl"]
    assert k["base_tuned"] > 0 and k["tuned_base"] > 0 and k["base_tuned"] != k["tuned_base"]
    per = k["per_doc"]
    assert np.sum(per["kl"]) / np.sum(per["tokens"]) == pytest.approx(k["base_tuned"])
    assert k["tokens"] == sum(t["tokens"])  # the same positions as the target NLL


def test_a_model_against_itself_has_zero_target_kl_and_no_per_doc_unless_asked(tiny) -> None:
    ev = evaluate(tiny.model, tiny.tokenizer, tiny.model, target_docs=DOCS, target_kl=True, seq_len=32)
    assert ev["target_kl"]["base_tuned"] == pytest.approx(0.0, abs=1e-6)
    assert ev["target_kl"]["tuned_base"] == pytest.approx(0.0, abs=1e-6)
    assert "per_doc" not in ev["target"] and "per_doc" not in ev["target_kl"]
