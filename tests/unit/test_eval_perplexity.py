"""NLL, perplexity and bits per byte against an independent plain-transformers computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adaptlab.data.sources import Document
from adaptlab.evaluate.perplexity import make_windows, score_documents, summarize

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tea is brewed by pouring hot water over cured leaves of the tea plant, and it is served hot or cold.",
    "Short.",
    "A longer passage about rivers: they carry water from mountains to the sea, shaping valleys " * 3,
]


def reference_nll(model, tokenizer, text: str, seq_len: int) -> tuple[float, int]:
    """Plain transformers: EOS + tokens, windows of seq_len scored tokens, no batching, no padding."""
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    total, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, seq_len):
            chunk = torch.tensor([ids[a : a + seq_len + 1]])
            logits = model(chunk[:, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return total, count


@pytest.mark.parametrize("seq_len", [512, 16])
def test_nll_matches_plain_transformers(tiny, seq_len):
    scores = score_documents(tiny.model, tiny.tokenizer, TEXTS, seq_len=seq_len, batch_size=3)
    for i, text in enumerate(TEXTS):
        ref, n = reference_nll(tiny.model, tiny.tokenizer, text, seq_len)
        assert scores.tokens[i] == n == len(tiny.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert scores.nll[i] == pytest.approx(ref, rel=1e-4, abs=1e-3)
    fig = summarize(scores)
    total = sum(reference_nll(tiny.model, tiny.tokenizer, t, seq_len)[0] for t in TEXTS)
    nbytes = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert fig["nll"] == pytest.approx(total / fig["tokens"], rel=1e-4)
    assert fig["ppl"] == pytest.approx(math.exp(fig["nll"]), rel=1e-9)
    assert fig["bpb"] == pytest.approx(total / math.log(2) / nbytes, rel=1e-4)
    assert fig["docs"] == len(TEXTS)


def test_batch_size_does_not_change_figures(tiny):
    a = score_documents(tiny.model, tiny.tokenizer, TEXTS, seq_len=24, batch_size=1)
    b = score_documents(tiny.model, tiny.tokenizer, TEXTS, seq_len=24, batch_size=8)
    assert a.tokens.tolist() == b.tokens.tolist()
    assert a.nll == pytest.approx(b.nll, rel=1e-4)


def test_windows_score_every_token_once():
    seq = list(range(50))
    for stride in (None, 7, 16):
        windows = make_windows([seq], [None], seq_len=16, stride=stride)
        scored = []
        for w in windows:
            assert len(w.ids) - 1 <= 16  # the model never sees more than seq_len inputs
            scored.extend(w.ids[w.first + 1 :])
        assert scored == seq[1:]
    overlapping = make_windows([seq], [None], seq_len=16, stride=4)
    assert all(len(w.ids) - 1 == 16 for w in overlapping[4:])  # full context once available


def test_stride_gives_more_context_and_lower_nll(tiny):
    text = [TEXTS[3] * 2]
    plain = score_documents(tiny.model, tiny.tokenizer, text, seq_len=16)
    strided = score_documents(tiny.model, tiny.tokenizer, text, seq_len=16, stride=4)
    assert plain.tokens.tolist() == strided.tokens.tolist()
    assert plain.nll[0] != pytest.approx(strided.nll[0], rel=1e-6)


def test_chat_records_score_the_response_only(tiny):
    doc = Document(
        id="c",
        messages=({"role": "user", "content": "Define tea."}, {"role": "assistant", "content": "A drink."}),
    )
    scores = score_documents(tiny.model, tiny.tokenizer, [doc])
    n_response = len(tiny.tokenizer("A drink.", add_special_tokens=False)["input_ids"])
    assert n_response <= scores.tokens[0] <= n_response + 3  # + end-of-turn tokens of the template
    assert scores.bytes[0] == len(b"A drink.")
