"""Documents -> train/val/test splits by document -> token examples (packed text blocks or chat rows).

Splits are decided per document from a stable hash of its id, so adding documents never moves
existing ones between splits. Plain text is tokenized, joined with EOS between documents and packed
into fixed blocks of seq_len tokens; instruction records become one example each, loss on the
response only (see instruct.py).

    python -c "from adaptlab.data.corpus import *; print(split_fraction('stdlib/os.py'))"
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import torch

from adaptlab.data.example import IGNORE_INDEX, Example, collate
from adaptlab.data.instruct import encode_chat
from adaptlab.data.sources import Document
from adaptlab.errors import UserError

__all__ = ["IGNORE_INDEX", "Example", "collate", "build_examples", "split_documents", "split_fraction"]

Split = Literal["train", "val", "test", "all"]
SPLITS = ("train", "val", "test", "all")


def split_fraction(doc_id: str) -> float:
    """A document's position in [0, 1), from a hash that is stable across runs and machines."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: list[Document], split: Split, val_frac: float = 0.05, test_frac: float = 0.05
) -> list[Document]:
    """The documents of one split: test is u < test_frac, val the next val_frac, train the rest.

    With so few documents that a held-out split would be empty, the documents with the lowest
    hash positions fill it (one each), so every split is non-empty from 3 documents on. Under 3
    documents nothing is held out: all of them train.
    """
    if split == "all":
        return list(docs)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    ranked = sorted(docs, key=lambda d: (split_fraction(d.id), d.id))
    u = [split_fraction(d.id) for d in ranked]
    n_test = sum(1 for x in u if x < test_frac)
    n_val = sum(1 for x in u if test_frac <= x < test_frac + val_frac)
    if len(ranked) < 3:
        n_test = n_val = 0
    else:
        n_test, n_val = max(n_test, 1 if test_frac > 0 else 0), max(n_val, 1 if val_frac > 0 else 0)
    bounds = {"test": (0, n_test), "val": (n_test, n_test + n_val), "train": (n_test + n_val, len(ranked))}
    lo, hi = bounds[split]
    chosen = {d.id for d in ranked[lo:hi]}
    return [d for d in docs if d.id in chosen]  # keep the source order


def tokenize_text(docs: list[Document], tokenizer: Any) -> list[list[int]]:
    """Token ids per plain-text document, without special tokens (EOS is added when packing)."""
    texts = [d.text for d in docs]
    out: list[list[int]] = []
    for start in range(0, len(texts), 256):
        out.extend(tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"])
    return out


def build_examples(
    docs: list[Document],
    tokenizer: Any,
    seq_len: int,
    seed: int = 0,
    max_examples: int | None = None,
    split: str = "train",
) -> list[Example]:
    """Token examples for training or validation: packed text blocks and/or chat rows.

    Documents are packed in a seeded shuffled order so blocks mix documents; with max_examples,
    only as many documents as needed are tokenized. `split` names the documents in the error
    raised when they are shorter than one block.
    """
    if seq_len < 8:
        raise UserError(f"--seq-len must be at least 8 (got {seq_len})")
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [docs[i] for i in order]
    text_docs = [d for d in shuffled if not d.is_chat]
    chat_docs = [d for d in shuffled if d.is_chat]
    examples = [encode_chat(d, tokenizer, seq_len) for d in chat_docs[:max_examples]]
    eos = tokenizer.eos_token_id
    remaining = None if max_examples is None else max(max_examples - len(examples), 0)
    # Tokenize in chunks so a large corpus with a small budget tokenizes only what it needs; the
    # stream is documents joined by EOS, cut into blocks, the tail carried to the next chunk.
    buf_blocks: list[Example] = []
    tail: list[int] = []
    for start in range(0, len(text_docs), 64):
        if remaining is not None and len(buf_blocks) >= remaining:
            break
        for ids in tokenize_text(text_docs[start : start + 64], tokenizer):
            tail.extend(ids)
            tail.append(eos)
        n_full = len(tail) // seq_len
        for b in range(n_full):
            block = tail[b * seq_len : (b + 1) * seq_len]
            buf_blocks.append(Example(block, list(block)))
        tail = tail[n_full * seq_len :]
    if remaining is not None:
        buf_blocks = buf_blocks[:remaining]
    examples.extend(buf_blocks)
    if not examples:
        raise _too_short(split, len(docs), len(tail), seq_len)
    return examples


def _too_short(split: str, n_docs: int, n_tokens: int, seq_len: int) -> UserError:
    """What to do when a split's text is shorter than one block."""
    what = {"train": "training", "val": "validation", "test": "test"}.get(split, split)
    fix = "lower --seq-len or add text"
    if split in ("val", "test"):
        fix = (
            f"lower --seq-len, raise data.{split}_frac (more documents held out for {what}) or add documents"
        )
    return UserError(
        f"the {what} split ({n_docs} document{'s' * (n_docs != 1)}, {n_tokens:,} tokens) is shorter than "
        f"one --seq-len {seq_len} block: {fix}"
    )


def start_token(tokenizer: Any) -> int:
    """BOS when the tokenizer adds it by default, else EOS (the document separator in packed training)."""
    bos = tokenizer.bos_token_id
    if bos is not None:
        probe = tokenizer("a")["input_ids"]
        if probe and probe[0] == bos:
            return int(bos)
    if tokenizer.eos_token_id is None:
        raise UserError(
            "the tokenizer has neither a BOS nor an EOS token: cannot mark where a document starts"
        )
    return int(tokenizer.eos_token_id)
