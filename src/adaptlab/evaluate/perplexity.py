"""Per-document negative log-likelihood of held-out text: NLL per token, perplexity, bits per byte.

Token conventions (what is scored, and on what context):
  - A plain-text document is tokenized without special tokens and scored as its own sequence,
    preceded by one start token: the tokenizer's BOS when it adds one by default (Llama-2 style),
    else EOS, the separator training packs between documents (SmolLM2 style). Every token of the
    document is scored, the start token is not, no EOS is appended.
  - An instruction record (prompt/response or messages) is rendered with the chat template as in
    training (data/instruct.py); only the response tokens are scored, and its bytes are the
    UTF-8 bytes of the response.
  - A long document is cut into windows of seq_len scored tokens; stride = seq_len (the default)
    means no overlap: each window starts fresh, conditioned on the token just before it. With a
    smaller stride each window scores `stride` new tokens with up to seq_len tokens of context.

Figures: nll = total NLL / scored tokens (nats), ppl = exp(nll), bpb = total NLL / ln 2 / UTF-8
bytes. Windows are packed several to a row (attention kept inside each window, positions restarting:
data/packing.py), so short documents cost their own tokens and no padding; the per-token NLL is taken
from the final hidden states chunk by chunk (adaptlab.losses), under torch.inference_mode.

    python -c "from adaptlab.evaluate.perplexity import *; from adaptlab.models import load_model as l; \\
m = l('tiny-random'); print(summarize(score_documents(m.model, m.tokenizer, ['Hello world.'])))"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptlab.data.corpus import start_token
from adaptlab.data.example import IGNORE_INDEX
from adaptlab.data.instruct import encode_chat
from adaptlab.data.packing import Span, pack_rows, pack_sequences
from adaptlab.data.sources import Document
from adaptlab.errors import UserError
from adaptlab.losses import next_token_nll

Progress = Callable[[int], None]  # called with the number of tokens just processed


@dataclass
class Window:
    """One model input: ids (T,), and the positions whose next-token prediction is scored."""

    doc: int  # index of the document it came from
    ids: list[int]
    first: int  # positions first .. len(ids)-2 predict ids[first+1 ..]
    mask: list[bool] | None = None  # per scored position (len(ids)-1-first), None = all scored

    @property
    def n_scored(self) -> int:
        n = len(self.ids) - 1 - self.first
        return n if self.mask is None else sum(self.mask)


@dataclass
class DocScores:
    """Per-document sums, aligned with the documents given (float64 NLL sums in nats)."""

    nll: np.ndarray  # (N,) summed NLL of scored tokens
    tokens: np.ndarray  # (N,) scored tokens
    bytes: np.ndarray  # (N,) UTF-8 bytes of the scored text

    def to_json(self) -> dict[str, list[float]]:
        return {"nll": self.nll.tolist(), "tokens": self.tokens.tolist(), "bytes": self.bytes.tolist()}

    @classmethod
    def from_json(cls, obj: dict[str, list[float]]) -> DocScores:
        return cls(
            np.asarray(obj["nll"], dtype=np.float64),
            np.asarray(obj["tokens"], dtype=np.int64),
            np.asarray(obj["bytes"], dtype=np.int64),
        )


def as_documents(texts: Sequence[str | Document]) -> list[Document]:
    return [t if isinstance(t, Document) else Document(id=str(i), text=t) for i, t in enumerate(texts)]


def encode_documents(
    docs: Sequence[str | Document], tokenizer: Any, seq_len: int
) -> tuple[list[list[int]], list[list[bool] | None], list[int]]:
    """(token sequence incl. start token, scored mask over positions 1.. or None = all, bytes) per document."""
    docs = as_documents(docs)
    start = start_token(tokenizer)
    seqs: list[list[int]] = [[] for _ in docs]
    masks: list[list[bool] | None] = [None for _ in docs]
    nbytes = [0 for _ in docs]
    plain = [i for i, d in enumerate(docs) if not d.is_chat]
    for lo in range(0, len(plain), 256):
        chunk = plain[lo : lo + 256]
        enc = tokenizer([docs[i].text for i in chunk], add_special_tokens=False)["input_ids"]
        for i, ids in zip(chunk, enc, strict=True):
            seqs[i] = [start, *ids]
            nbytes[i] = len(docs[i].text.encode("utf-8"))
    for i, d in enumerate(docs):
        if d.is_chat:
            ex = encode_chat(d, tokenizer, seq_len=1 << 30)
            seqs[i] = ex.input_ids
            masks[i] = [lab >= 0 for lab in ex.labels[1:]]
            nbytes[i] = len(d.messages[-1]["content"].encode("utf-8"))
    return seqs, masks, nbytes


def make_windows(
    seqs: Sequence[list[int]], masks: Sequence[list[bool] | None], seq_len: int, stride: int | None = None
) -> list[Window]:
    """Cut each sequence into windows that score every position once (see the module docstring)."""
    stride = stride or seq_len
    if seq_len < 2 or not 1 <= stride <= seq_len:
        raise UserError(f"need --seq-len >= 2 and 1 <= --stride <= --seq-len (got {seq_len}, {stride})")
    windows: list[Window] = []
    for d, (seq, mask) in enumerate(zip(seqs, masks, strict=True)):
        n_targets = len(seq) - 1  # target t predicts seq[t+1] from seq[: t+1]
        for a in range(0, n_targets, stride):
            b = min(a + stride, n_targets)
            # input positions lo .. b-1, the last b-a are scored; no overlap unless stride < seq_len
            lo = a if stride == seq_len else max(0, b - seq_len)
            ids = seq[lo : b + 1]  # includes the last target; dropped from the input below
            sub = None if mask is None else mask[a:b]
            if sub is not None and not any(sub):
                continue
            windows.append(Window(doc=d, ids=ids, first=a - lo, mask=sub))
    return windows


def batches(windows: list[Window], batch_size: int, seq_len: int | None = None) -> Iterator[list[Window]]:
    """Longest first (a too-large batch fails at once, not at the end); similar lengths share a batch.

    With seq_len, a batch holds as many windows as fit in batch_size x seq_len input tokens (rows x
    its widest row), so short documents share one large forward pass at the same peak memory.
    """
    order = sorted(windows, key=lambda w: -len(w.ids))
    budget = batch_size * seq_len if seq_len else None
    i = 0
    while i < len(order):
        width = len(order[i].ids) - 1
        rows = batch_size if budget is None else max(batch_size, budget // max(width, 1))
        yield order[i : i + rows]
        i += rows


def collate_windows(batch: list[Window], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded inputs (B, T) and next-token targets (B, T); Window says which positions are scored."""
    width = max(len(w.ids) for w in batch) - 1
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.zeros((len(batch), width), dtype=torch.long)
    for r, w in enumerate(batch):
        n = len(w.ids) - 1
        ids[r, :n] = torch.tensor(w.ids[:-1])
        attn[r, :n] = 1
        targets[r, :n] = torch.tensor(w.ids[1:])
    return {
        "input_ids": ids.to(device),
        "attention_mask": attn.to(device),
        "targets": targets.to(device),
    }


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def window_targets(w: Window) -> list[int]:
    """What each input position of a window predicts, IGNORE_INDEX where nothing is scored."""
    scored = w.ids[w.first + 1 :]
    keep = w.mask if w.mask is not None else [True] * len(scored)
    return [IGNORE_INDEX] * w.first + [t if k else IGNORE_INDEX for t, k in zip(scored, keep, strict=True)]


def window_batches(
    windows: list[Window], batch_size: int, seq_len: int, pad: int, device: torch.device, pack: bool = True
) -> Iterator[tuple[dict[str, torch.Tensor], list[Span]]]:
    """Model batches over the windows, each with every window's span (row, columns).

    pack=True: windows share rows of seq_len input tokens (data/packing.py: attention kept inside each
    window, positions restarting), batch_size rows a batch. pack=False: one window a row, right-padded,
    with an attention mask (the batches of `batches`).
    """
    inputs = [w.ids[:-1] for w in windows]
    targets = [window_targets(w) for w in windows]
    if pack:
        rows = pack_rows([len(x) for x in inputs], seq_len)
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        index = {id(w): i for i, w in enumerate(windows)}
        groups = [[[index[id(w)]] for w in b] for b in batches(windows, batch_size, seq_len)]
    for group in groups:
        width = max(sum(len(inputs[i]) for i in row) for row in group)
        batch, spans = pack_sequences(inputs, targets, group, width, pad)
        if not pack:
            del batch["position_ids"]  # padded rows: the attention mask keeps pad out of sight
        yield {k: v.to(device) for k, v in batch.items()}, spans


def score_documents(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str | Document],
    seq_len: int = 512,
    batch_size: int = 8,
    stride: int | None = None,
    progress: Progress | None = None,
    pack: bool = True,
) -> DocScores:
    """Summed NLL, scored tokens and bytes per document (see the module docstring for conventions).

    Windows are packed several to a row (pack=False: one a row, padded); the NLL is taken chunk by
    chunk from the final hidden states (adaptlab.losses), never from full (B, T, V) logits.
    """
    seqs, masks, nbytes = encode_documents(docs, tokenizer, seq_len)
    windows = make_windows(seqs, masks, seq_len, stride)
    nll = np.zeros(len(seqs), dtype=np.float64)
    tokens = np.zeros(len(seqs), dtype=np.int64)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for t, spans in window_batches(windows, batch_size, seq_len, pad, device, pack):
                per_position = next_token_nll(model, t, t["targets"]).double()  # (B, T)
                for s in spans:
                    w = windows[s.item]
                    nll[w.doc] += float(per_position[s.row, s.start : s.end].sum())
                    tokens[w.doc] += w.n_scored
                if progress:
                    progress(int(t["attention_mask"].sum()))
    finally:
        model.train(was_training)
    return DocScores(nll=nll, tokens=tokens, bytes=np.asarray(nbytes, dtype=np.int64))


def summarize(scores: DocScores) -> dict[str, float | int]:
    """{"nll", "ppl", "bpb", "tokens", "docs"} from per-document sums."""
    total, tokens, nbytes = float(scores.nll.sum()), int(scores.tokens.sum()), int(scores.bytes.sum())
    if tokens == 0:
        raise UserError("no token to score: the documents are empty after tokenization")
    nll = total / tokens
    return {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),
        "bpb": total / math.log(2) / nbytes if nbytes else float("nan"),
        "tokens": tokens,
        "docs": len(scores.nll),
    }
