"""Training curves unchanged by the chunked loss and packing: a 20-step smollm2-135m LoRA run.

The losses below were recorded by the loop that took the cross-entropy of full fp32 logits (same
config, same data, 1 thread and 2 threads gave the same first loss to every digit). The chunked loss
sums in another order, so the run must match them within fp32 noise, not bit for bit: on the first
batch the full-logits loss was 5.2e-6 relative from a float64 reference and the chunked one 5e-9,
and over the 20 steps the two runs differed by at most 2.3e-5 relative.
"""

from __future__ import annotations

import pytest
from helpers import tiny_config, write_corpus

from adaptlab.rundir import RunDir
from adaptlab.train import train

pytestmark = pytest.mark.integration

# fmt: off
FULL_LOGITS_LOSSES = [
    3.493384709433904, 4.2122313484313, 3.714537121000744, 2.8288501557849703, 3.7621920146639387,
    2.0733090355282737, 3.6590733603825645, 2.7496190146794395, 3.0350547669425842, 3.3203817700582836,
    2.7301434713696677, 3.155158391074529, 2.8278445289248513, 3.6113833472842263, 4.095753987630208,
    4.026686168852306, 3.4385518876333085, 3.563485524011037, 3.804533216688368, 2.9324134947761658,
]
# fmt: on
FULL_LOGITS_VAL_LOSS = 2.684206281389509


def test_lora_curve_equals_the_full_logits_loop(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    cfg = tiny_config(corpus, tmp_path / "run", method="lora", steps=20, batch=2, seq_len=64, lr=2e-3, rank=8)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "smollm2-135m"})})
    summary = train(cfg)
    losses = [r["loss"] for r in RunDir(tmp_path / "run").read_metrics() if "loss" in r]
    assert losses == pytest.approx(FULL_LOGITS_LOSSES, rel=1e-4, abs=0)
    assert summary["final_val_loss"] == pytest.approx(FULL_LOGITS_VAL_LOSS, rel=1e-4)
