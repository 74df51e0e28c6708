"""Padding-free packing: rows filled correctly, and packed scoring equal to one-document-a-row scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptlab.data.example import IGNORE_INDEX, Example, collate
from adaptlab.data.packing import collate_micro_batch, collate_packed, pack_rows
from adaptlab.evaluate.perplexity import score_documents
from adaptlab.losses import token_loss_sum

SHORT_DOCS = [
    "A cat.",
    "The quick brown fox jumps over the lazy dog, twice, and then sleeps.",
    "Rivers run to the sea.",
    "x",
    "Packing puts several documents in one row; attention must not cross from one into the next.",
    "Seven.",
    "An adapter is a small set of weights added to a frozen model.",
]


def test_pack_rows_fills_first_fit_decreasing_within_capacity():
    lengths = [5, 3, 2, 4, 8, 1, 7]
    rows = pack_rows(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 4  # 30 tokens need at least 4 rows of 8
    with pytest.raises(ValueError, match="more than a row"):
        pack_rows([9], 8)


def test_collate_packed_restarts_positions_and_scores_no_boundary():
    examples = [Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [IGNORE_INDEX, 9]), Example([4], [4])]
    batch = collate_packed(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    # the first label of a packed example is never a target of the previous example's last token
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].sum() == 6


def test_packed_document_nll_equals_unpacked(tiny):
    packed = score_documents(tiny.model, tiny.tokenizer, SHORT_DOCS, seq_len=48, batch_size=2, pack=True)
    plain = score_documents(tiny.model, tiny.tokenizer, SHORT_DOCS, seq_len=48, batch_size=2, pack=False)
    assert np.array_equal(packed.tokens, plain.tokens)
    np.testing.assert_allclose(packed.nll, plain.nll, rtol=1e-5, atol=0)


def test_packed_document_nll_with_long_documents_cut_into_windows(tiny):
    docs = [" ".join(SHORT_DOCS) * 3, *SHORT_DOCS[:3]]
    packed = score_documents(tiny.model, tiny.tokenizer, docs, seq_len=32, batch_size=3, pack=True)
    plain = score_documents(tiny.model, tiny.tokenizer, docs, seq_len=32, batch_size=3, pack=False)
    np.testing.assert_allclose(packed.nll, plain.nll, rtol=1e-5, atol=0)


def test_packed_chat_micro_batch_takes_the_padded_batch_loss(tiny):
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, prompt in [(30, 10), (12, 4), (9, 3), (25, 20), (6, 2)]:
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    packed = collate_micro_batch(examples, pad_id=0)
    padded = collate(examples, pad_id=0)
    assert "position_ids" in packed and packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        a, na = token_loss_sum(tiny.model, packed)
        b, nb = token_loss_sum(tiny.model, padded)
    assert na == nb
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_equal_length_blocks_are_not_packed():
    blocks = [Example(list(range(8)), list(range(8))) for _ in range(3)]
    batch = collate_micro_batch(blocks, pad_id=0)
    assert "position_ids" not in batch and batch["input_ids"].shape == (3, 8)
