"""The rank study keeps the update scale fixed across ranks (rsLoRA, one alpha) unless told alpha = 2 x
rank, builds PEFT adapters that scale that way, and says in results.json and the report which it used."""

from __future__ import annotations

import math

import pytest
from test_report_recommend import results
from test_report_render import _arm_with_run

from adaptlab.compare.arms import DEFAULT_RANK, min_linear_dim, rank_scaling_of, study_arms
from adaptlab.compare.spec import build_spec
from adaptlab.errors import UserError
from adaptlab.methods import apply_method
from adaptlab.models import load_model
from adaptlab.report.recommend import recommend
from adaptlab.report.render import write_report

BASE = {"model": "tiny-random", "data": {"train": ["x"]}, "tokens": 1000, "seeds": 1, "study": "rank"}


def _scale(arm, model_name: str = "tiny-random") -> float:
    """The scaling PEFT applies to the arm's update (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    model = apply_method(load_model(model_name).model, arm.method_spec())
    layer = next(m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict))
    return float(layer.scaling["default"])


def test_rank_arms_scale_their_update_the_same_at_every_rank_by_default() -> None:
    arms = [a for a in study_arms("rank", "tiny-random", 1000) if a.is_lora]
    assert len(arms) >= 3 and all(a.rslora for a in arms) and len({a.alpha for a in arms}) == 1
    alpha = arms[0].alpha
    default = min(DEFAULT_RANK, min_linear_dim("tiny-random"))
    assert alpha == pytest.approx(2 * math.sqrt(default))  # standard LoRA's scale 2 at the default rank
    for arm in (arms[0], arms[-1]):
        assert _scale(arm) == pytest.approx(alpha / math.sqrt(arm.rank))
    assert rank_scaling_of(arms)["rule"] == "rslora"


def test_alpha_two_x_rank_is_an_option() -> None:
    spec = build_spec({**BASE, "rank_scaling": "alpha-2r"})
    arms = [a for a in study_arms("rank", "tiny-random", 1000, rank_scaling=spec.rank_scaling) if a.is_lora]
    assert not any(a.rslora for a in arms) and all(a.lora_alpha == 2 * a.rank for a in arms)
    assert _scale(arms[-1]) == pytest.approx(2.0)
    assert rank_scaling_of(arms)["rule"] == "alpha-2r"
    with pytest.raises(UserError, match="rank study only"):
        build_spec({**BASE, "study": "methods", "rank_scaling": "alpha-2r"})
    with pytest.raises(UserError, match="unknown rank scaling"):
        build_spec({**BASE, "rank_scaling": "sqrt"})


def test_the_report_says_which_scaling_the_rank_study_used_and_that_one_seed_is_unreplicated(
    tmp_path,
) -> None:
    arms = [
        _arm_with_run(tmp_path, "full", "full", 0.5, 0.2),
        _arm_with_run(tmp_path, "lora-r1", "lora", 0.3, 0.05),
    ]
    res = results(*arms, study="rank", model="tiny-random", budget_tokens=512, seeds=1, notes=[])
    res.update(
        data={
            "target": ["t"],
            "general": [],
            "drift": True,
            "mc": [],
            "eval_docs": 64,
            "eval_max_chars": 100,
        },
        budget_note="every arm saw the same 512 tokens in the same order",
        rank_scaling=rank_scaling_of(study_arms("rank", "tiny-random", 1000)),
    )
    res["recommendation"] = recommend(res)
    paths = write_report(res, tmp_path)
    for text in (paths["md"].read_text(), paths["html"].read_text()):
        assert "Rank scaling: rsLoRA" in text and "Seeds per arm: 1 (unreplicated" in text
    del res["rank_scaling"]
    res["seeds"] = 3
    res["recommendation"] = recommend(res)
    md = write_report(res, tmp_path)["md"].read_text()
    assert "Rank scaling" not in md and "Seeds per arm: 1" not in md
