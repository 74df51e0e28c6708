"""The report reads at a glance: paired differences against the pick first, no repeated column,
a noisy machine said in the cost table, the predictor and the extrapolation rendered."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from test_report_paired import arm

from adaptlab.report.extrapolate import extrapolate
from adaptlab.report.predictor import kl_predictor
from adaptlab.report.recommend import recommend
from adaptlab.report.render import write_report


def _complete(a: dict[str, Any], tokens: int, noisy: bool) -> dict[str, Any]:
    a["forgetting"]["metric"] = "general_nll"
    a["forgetting"]["general_nll"] = dict(a["forgetting"])
    a["forgetting"]["drift"] = {"value": 0.01, "ci95": [0.008, 0.012]}
    a["config"].update(lr=1e-4, lr_source="rule", seq_len=32)
    a["runs"] = []
    a["final_val_loss"] = 2.5
    a["cost"].update(
        total_params=10**6,
        wall_s=30.0,
        tokens_per_s=500.0,
        artifact_bytes=10**6,
        tokens_seen=tokens,
        noisy_machine=noisy,
        step_time_cv=0.6 if noisy else 0.02,
    )
    return a


def _results() -> dict[str, Any]:
    arms = [
        _complete(arm(f"{m}-{t}", m, gain=g * (t / 1000) ** 0.5, forget=0.05, seed=i), t, noisy=(i == 0))
        for i, (m, g) in enumerate((("full", 0.3), ("lora", 0.2)))
        for t in (1000, 2000, 4000)
    ]
    res = {
        "arms": arms,
        "forgetting_metric": "general_nll",
        "lr_rule": "rule",
        "study": None,
        "model": "tiny-random",
        "data": {
            "target": ["t"],
            "general": ["g"],
            "drift": True,
            "mc": [],
            "eval_docs": 64,
            "eval_max_chars": None,
        },
        "budget_note": "budgets differ",
        "seeds": 1,
        "notes": [],
    }
    res["kl_predictor"] = kl_predictor(arms, "general_nll")
    res["extrapolation"] = extrapolate(arms, "general_nll", target_tokens=64000)
    res["recommendation"] = recommend(res)
    return res


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One comparison's results and the folder its report was written to (rendered once)."""
    out = tmp_path_factory.mktemp("report")
    res = _results()
    write_report(res, out)
    return res, out


def test_main_table_starts_with_paired_differences_and_repeats_no_column(report) -> None:
    _, out = report
    html = (out / "report.html").read_text()
    header = re.search(r'<table class="main">\s*<tr>(.*?)</tr>', html, re.S).group(1)
    cols = re.findall(r"<th>(.*?)</th>", header)
    assert cols[:3] == ["arm", "learning &minus; pick", "forgetting &minus; pick"]
    assert "general NLL increase" not in cols  # general text is the forgetting measure: one column
    assert "drift KL" in cols and len(cols) == len(set(cols))
    assert "final val loss" not in cols  # with the setup, in the arms table
    md = (out / "report.md").read_text()
    assert "| arm | learning - pick | forgetting - pick |" in md


def test_noisy_machine_extrapolation_and_predictor_are_said(report) -> None:
    res, out = report
    md = (out / "report.md").read_text()
    assert "Step times of full-1000, full-2000, full-4000 varied far more" in md
    assert "noisy (step-time cv 0.60)" in md and "| steady |" in md
    assert (
        "## Budget extrapolation" in md
        and "At 64,000 tokens, against full, lora is expected to learn less by" in md
    )
    assert "extrapolates 16x beyond the largest budget" in md
    assert "Check on full: fitted without its largest budget" in md
    assert "Forgetting predictor" in md and res["kl_predictor"]["verdict"].startswith(
        "not measured"
    )  # no arm here has the target KL
