"""smollm2-135m: multiple choice matches the lm-eval figures seen on the same 20 items; sane perplexity."""

from __future__ import annotations

import itertools
import json

import pytest

pytestmark = pytest.mark.integration


def test_smollm2_mc_and_general_perplexity(shared_data, tmp_path):
    from adaptlab.evaluate import evaluate
    from adaptlab.models import load_model

    items = tmp_path / "wordnet20.jsonl"
    with (shared_data / "mc" / "wordnet_meaning.jsonl").open() as fh:
        items.write_text("".join(itertools.islice(fh, 20)))
    with (shared_data / "general" / "wordnet_glosses.jsonl").open() as fh:
        glosses = [json.loads(line)["text"] for line in itertools.islice(fh, 16)]
    m = load_model("smollm2-135m")
    result = evaluate(
        m.model, m.tokenizer, general_docs=glosses, mc_files=[items], batch_size=8, n_resamples=200
    )
    mc = result["mc"]["wordnet20"]
    # lm-evaluation-harness 0.4.13 on these 20 items and this model: acc 0.30, acc_norm 0.35
    assert mc["n"] == 20 and mc["acc"] == pytest.approx(0.30) and mc["acc_norm"] == pytest.approx(0.35)
    g = result["general"]
    assert 3.0 < g["nll"] < 7.0 and 0.5 < g["bpb"] < 3.0 and g["docs"] == 16
