"""Multiple choice: lm-eval's log-likelihood scoring, item validation with file:line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adaptlab.evaluate.choice import encode_pair, load_items, score_items

ITEMS = [
    {"question": "Which is a fruit?", "choices": ["apple", "hammer", "cloud"], "answer": 0},
    {"question": "What colour is the sky on a clear day?", "choices": ["green", "blue"], "answer": 1},
    {"question": "Which animal barks?", "choices": ["a cat", "a dog", "a fish", "a bird"], "answer": 1},
]


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_encode_pair_splits_after_the_context(tiny):
    ctx, cont = encode_pair(tiny.tokenizer, "Q?\nAnswer:", " blue")
    whole = tiny.tokenizer("Q?\nAnswer: blue")["input_ids"]
    assert ctx + cont == whole and ctx == tiny.tokenizer("Q?\nAnswer:")["input_ids"]
    # trailing whitespace of the context moves to the continuation
    ctx2, cont2 = encode_pair(tiny.tokenizer, "Q?\nAnswer: ", "blue")
    assert (ctx2, cont2) == (ctx, cont)


def test_scores_match_a_direct_computation(tiny, tmp_path):
    items = load_items(write(tmp_path / "items.jsonl", ITEMS))
    scores = score_items(tiny.model, tiny.tokenizer, items, batch_size=4)
    for i, item in enumerate(items):
        lls = []
        for choice in item.choices:
            ctx, cont = encode_pair(tiny.tokenizer, f"{item.question}\nAnswer:", f" {choice}")
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = torch.log_softmax(tiny.model(ids[:, :-1]).logits[0].double(), -1)
            lls.append(float(sum(lp[len(ctx) - 1 + k, t] for k, t in enumerate(cont))))
        assert scores.loglik[i] == pytest.approx(lls, rel=1e-4)
        assert scores.acc[i] == float(np.argmax(lls) == item.answer)
        norm = np.asarray(lls) / np.asarray([len(c) for c in item.choices])
        assert scores.acc_norm[i] == float(np.argmax(norm) == item.answer)


BAD = [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "at least 2"),
    ({"question": "q", "answer": 0}, "missing field(s) choices"),
    ({"choices": ["a", "b"], "answer": 0}, "missing field(s) question"),
    ({"question": "q", "choices": ["a", "b"], "answer": "1"}, "integer"),
    ("{not json", "malformed JSON"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_items_exit_2_with_file_line(run_cli, tmp_path, bad, message):
    path = write(tmp_path / "bad.jsonl", [ITEMS[0], ITEMS[1], bad])
    code, out, err = run_cli("eval", "--model", "tiny-random", "--mc", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{path}:3:" in lines[0] and message in lines[0]
    assert "Traceback" not in err


def test_eval_cli_mc_json(run_cli, tmp_path):
    path = write(tmp_path / "things.jsonl", ITEMS)
    code, out, err = run_cli("eval", "--model", "tiny-random", "--mc", path, "--json", "--batch", "4")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["mc"]["things"]) == {"acc", "acc_norm", "n"}
    assert result["mc"]["things"]["n"] == 3
