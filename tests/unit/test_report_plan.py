"""The plan states published findings as priors with their mixed evidence, and quotes comparisons
already measured for the same base instead."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_corpus

from adaptlab.plan import plan
from adaptlab.plan.advice import FORGETTING_PRIOR


def _results(model: str) -> dict:
    arm = lambda name, method, learn, forget: {  # noqa: E731
        "name": name,
        "method": method,
        "status": "ok",
        "learning": {"value": learn},
        "forgetting": {"value": forget},
    }
    return {
        "model": model,
        "data": {"target": ["my-domain"]},
        "forgetting_metric": "general_nll",
        "arms": [arm("full", "full", 0.41, 0.012), arm("lora", "lora", 0.30, 0.019)],
        "recommendation": {
            "pick": "full",
            "findings": [
                {"id": "learns_less", "verdict": "agrees"},
                {"id": "forgets_less", "verdict": "disagrees"},
            ],
        },
    }


def test_plan_gives_the_forgetting_finding_as_a_prior_not_a_fact(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=4)
    rec = plan("tiny-random", [str(data)], benchmark=False, compare_root=str(tmp_path / "none"))[
        "recommendation"
    ]
    text = " ".join(rec["reasons"])
    assert FORGETTING_PRIOR in rec["reasons"] and rec["priors"] == [FORGETTING_PRIOR]
    assert "prior, not a measurement" in text and "evidence is mixed" in text
    assert "keeps more of the base model's general ability" not in text
    assert rec["measured"] == []


def test_plan_quotes_a_comparison_of_the_same_base(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=4)
    root = tmp_path / "runs"
    for name, model in (("cmp", "tiny-random"), ("other", "smollm2-135m")):
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps(_results(model)))
    rec = plan("tiny-random", [str(data)], benchmark=False, compare_root=str(root))["recommendation"]
    (measured,) = rec["measured"]
    assert "full learning 0.4100 / forgetting 0.0120" in measured and "lora learning 0.3000" in measured
    assert "LoRA forgets less: disagrees" in measured and str(root / "cmp") in measured
    assert measured in rec["reasons"] and FORGETTING_PRIOR not in rec["reasons"]
