"""Bootstrap CI sanity and the base-figure cache (a hit computes nothing: counted, not timed)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from adaptlab.evaluate import evaluate
from adaptlab.evaluate.cache import BaseCache, model_identity
from adaptlab.evaluate.stats import item_deltas, paired_delta_ci, ratio_ci


def test_ratio_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 50), rng.normal(2.0, 1.0, 5000)
    lo_s, hi_s = ratio_ci(small, np.ones_like(small))
    lo_l, hi_l = ratio_ci(large, np.ones_like(large))
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    assert ratio_ci(small, np.ones_like(small)) == [lo_s, hi_s]  # fixed seed: reproducible


def test_paired_ci_detects_a_shift_that_unpaired_noise_hides():
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 1.0, 200)  # large spread across documents
    tuned = base - 0.05 + rng.normal(0, 0.01, 200)  # small, consistent gain on every document
    ones = np.ones(200)
    lo, hi = paired_delta_ci(tuned, ones, base, ones)
    assert hi < 0 and lo < tuned.mean() - base.mean() < hi
    zero = paired_delta_ci(base, ones, base, ones)
    assert zero == [0.0, 0.0]


def test_item_deltas_name_each_figure_and_pair_the_items():
    rng = np.random.default_rng(3)
    base = (rng.random(40) < 0.5).astype(float)
    tuned = base.copy()
    tuned[np.flatnonzero(base == 0)[:10]] = 1.0  # ten items turn right, none turn wrong
    d = item_deltas([("acc", "ci95", tuned, base), ("acc_norm", "acc_norm_ci95", base, base)])
    assert list(d) == ["acc", "ci95", "acc_norm", "acc_norm_ci95"]
    assert d["acc"] == pytest.approx(0.25) and 0 < d["ci95"][0] < 0.25 < d["ci95"][1]
    assert d["acc_norm"] == 0.0 and d["acc_norm_ci95"] == [0.0, 0.0]


def test_base_figures_come_from_the_cache_the_second_time(tiny, tmp_path):
    base = tiny.model
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.norm.weight.mul_(1.1)
    calls = {"base": 0}
    hook = base.register_forward_pre_hook(lambda *_: calls.__setitem__("base", calls["base"] + 1))
    cache = BaseCache(tmp_path / "eval")
    docs = ["Bread is made from flour, water and yeast.", "Rain falls from clouds."]
    kwargs = dict(
        base_model=base,
        target_docs=docs,
        cache=cache,
        base_identity=model_identity("tiny-random", None, base),
        n_resamples=100,
    )
    try:
        first = evaluate(tuned, tiny.tokenizer, **kwargs)
        computed = calls["base"]
        second = evaluate(tuned, tiny.tokenizer, **kwargs)
        assert computed > 0 and calls["base"] == computed  # no base forward pass the second time
        assert cache.hits == 1 and cache.misses == 1
        assert second["target"]["base"] == first["target"]["base"]
        # other data is a different key
        evaluate(tuned, tiny.tokenizer, **{**kwargs, "target_docs": docs[:1]})
        assert calls["base"] > computed and cache.misses == 2
    finally:
        hook.remove()
    assert first["target"]["delta"]["nll"] == pytest.approx(
        first["target"]["nll"] - first["target"]["base"]["nll"]
    )


def test_identity_changes_with_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    a = model_identity("m", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert model_identity("m", tmp_path) != a
