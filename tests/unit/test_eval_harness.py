"""adaptlab's multiple-choice acc/acc_norm equal lm-evaluation-harness's on the same items and model."""

from __future__ import annotations

import itertools

import pytest

from adaptlab.evaluate import harness
from adaptlab.evaluate.choice import load_items, score_items, summarize

pytestmark = pytest.mark.harness


@pytest.fixture(scope="module")
def items_file(shared_data, tmp_path_factory):
    src = shared_data / "mc" / "wordnet_meaning.jsonl"
    out = tmp_path_factory.mktemp("mc") / "wordnet20.jsonl"
    with src.open() as fh:
        out.write_text("".join(itertools.islice(fh, 20)))
    return out


def test_acc_and_acc_norm_equal_lm_eval(tiny, items_file, tmp_path):
    pytest.importorskip("lm_eval")
    task = harness.write_mc_task(items_file, tmp_path / "tasks")
    theirs = harness.run_tasks(
        tiny.model, tiny.tokenizer, [task], include_path=tmp_path / "tasks", batch_size=8
    )
    ours = summarize(score_items(tiny.model, tiny.tokenizer, load_items(items_file), batch_size=8))
    assert ours["n"] == 20
    assert ours["acc"] == pytest.approx(theirs[task]["acc"], abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(theirs[task]["acc_norm"], abs=1e-12)
