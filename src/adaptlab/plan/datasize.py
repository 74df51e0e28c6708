"""How much data there is, in the model's own tokens: exact when small, sampled with a stated error when large.

Small data (up to EXACT_CHARS characters) is tokenized in full. Larger data is estimated with a ratio
estimator: tokens = (tokens per character in a random sample of documents) x (total characters, known
exactly), with a 95% confidence interval from the per-document variance of the residuals
(finite-population corrected). Tokens per epoch follow what training does: plain text is packed into
seq_len blocks of the train split (documents joined by EOS, the last partial block dropped); chat and
preference records are one row each, cut at seq_len.

    python -c "from adaptlab.plan.datasize import *; from adaptlab.models import load_tokenizer as t; \
print(measure_data(['python-stdlib'], t('tiny-random'), 256))"
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

from adaptlab.data.corpus import split_documents, tokenize_text
from adaptlab.data.instruct import encode_chat
from adaptlab.data.sources import Document, load_documents

EXACT_CHARS = 8_000_000
SAMPLE_DOCS = 1500
_Z95 = 1.96


@dataclass
class DataSize:
    """Document and token counts of a data set for one tokenizer and sequence length."""

    documents: int
    tokens: int  # every document, with the model's tokenizer (an estimate when exact is False)
    tokens_ci95: int  # half-width of the 95% interval on tokens; 0 when exact
    exact: bool
    sampled_documents: int
    characters: int
    kind: str  # text | chat | preference
    train_documents: int
    tokens_per_epoch: int  # tokens training processes per epoch (train split, at seq_len)
    examples_per_epoch: int  # packed blocks or rows per epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _doc_chars(doc: Document) -> int:
    return len(doc.text) if not doc.is_chat else sum(len(m["content"]) for m in doc.messages)


def _doc_tokens(docs: list[Document], tokenizer: Any, seq_len: int) -> list[int]:
    """Tokens per document: plain text without special tokens, chat rows rendered by the template (uncut)."""
    text = [d for d in docs if not d.is_chat]
    counts = dict(
        zip((d.id for d in text), (len(ids) for ids in tokenize_text(text, tokenizer)), strict=True)
    )
    out = []
    for d in docs:
        if d.is_chat:
            out.append(len(encode_chat(d, tokenizer, 1 << 30).input_ids))
        else:
            out.append(counts[d.id])
    return out


def _preference_documents(sources: list[str]) -> list[Document]:
    """Preference rows (data/preference.py) as two chat documents each (chosen, rejected)."""
    from adaptlab.data.preference import read_pairs

    return [
        Document(id=f"{row.id}#{side}", messages=(*row.prompt, response))
        for row in read_pairs(sources)
        for side, response in (("chosen", row.chosen), ("rejected", row.rejected))
    ]


def _pair_id(doc: Document) -> str:
    return doc.id.rsplit("#", 1)[0]


def measure_data(
    sources: list[str],
    tokenizer: Any,
    seq_len: int,
    task: str = "cpt",
    text_field: str = "text",
    val_frac: float = 0.05,
    test_frac: float = 0.05,
    exact_chars: int = EXACT_CHARS,
    sample_docs: int = SAMPLE_DOCS,
    seed: int = 0,
) -> DataSize:
    """Count documents and tokens of the data as training would see it (see the module docstring)."""
    if task == "dpo":
        docs = _preference_documents(sources)
        kind = "preference"
    else:
        docs = load_documents(sources, text_field)
        kind = "chat" if any(d.is_chat for d in docs) else "text"
    if kind == "preference":
        # split by pair, so chosen and rejected of one prompt stay together (as one record would)
        pairs = {_pair_id(d): d for d in docs[::2]}
        train_ids = {d.id for d in split_documents(list(pairs.values()), "train", val_frac, test_frac)}
        train = [d for d in docs if _pair_id(d) + "#chosen" in train_ids]
        n_docs = len(pairs)
    else:
        train = split_documents(docs, "train", val_frac, test_frac)
        n_docs = len(docs)
    chars = [_doc_chars(d) for d in docs]
    total_chars = sum(chars)
    exact = total_chars <= exact_chars or len(docs) <= sample_docs
    if exact:
        sample_idx = list(range(len(docs)))
    else:
        sample_idx = sorted(random.Random(seed).sample(range(len(docs)), sample_docs))
    sample = [docs[i] for i in sample_idx]
    counts = _doc_tokens(sample, tokenizer, seq_len)
    train_set = {d.id for d in train}
    if exact:
        tokens, ci = sum(counts), 0
        train_counts = [c for d, c in zip(sample, counts, strict=True) if d.id in train_set]
        scale = 1.0
    else:
        s_chars = [chars[i] for i in sample_idx]
        ratio = sum(counts) / max(sum(s_chars), 1)
        resid = [t - ratio * c for t, c in zip(counts, s_chars, strict=True)]
        n, big_n = len(sample), len(docs)
        mean_c = sum(s_chars) / n
        var = sum(r * r for r in resid) / max(n - 1, 1)
        se_ratio = math.sqrt((1 - n / big_n) * var / n) / max(mean_c, 1e-9)
        tokens = round(ratio * total_chars)
        ci = round(_Z95 * se_ratio * total_chars)
        train_counts = [c for d, c in zip(sample, counts, strict=True) if d.id in train_set]
        train_chars = sum(c for d, c in zip(docs, chars, strict=True) if d.id in train_set)
        sample_train_chars = sum(_doc_chars(d) for d in sample if d.id in train_set)
        scale = train_chars / max(sample_train_chars, 1)
    if kind == "text":
        stream = (sum(train_counts) + len(train_counts)) * scale  # + one EOS per document
        examples = int(stream // seq_len)
        per_epoch = examples * seq_len
    else:
        examples = round(len(train_counts) * scale)
        per_epoch = round(sum(min(c, seq_len) for c in train_counts) * scale)
    return DataSize(
        documents=n_docs,
        tokens=int(tokens),
        tokens_ci95=int(ci),
        exact=exact,
        sampled_documents=len(sample),
        characters=total_chars,
        kind=kind,
        train_documents=len(train) if kind != "preference" else len(train) // 2,
        tokens_per_epoch=int(per_epoch),
        examples_per_epoch=int(examples),
    )
