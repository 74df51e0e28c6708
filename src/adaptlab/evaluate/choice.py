"""Multiple-choice tasks scored by log-likelihood, exactly as lm-evaluation-harness 0.4 does by default.

Items are JSONL records `{"question": str, "choices": [str, ...], "answer": int}` (answer = 0-based
index of the right choice). For each choice:
  - context "{question}\\nAnswer:", continuation " {choice}";
  - trailing whitespace of the context moves to the continuation, then context + continuation is
    tokenized as one string (the tokenizer's default special tokens, as lm-eval's `tok_encode`)
    and the continuation's tokens are those after the context's own tokens (lm-eval `_encode_pair`);
  - the input is the last seq_len tokens of context + continuation minus its final token, and the
    score is the summed log-probability of the continuation's tokens.
acc: the argmax of the summed log-probabilities is the answer (ties: the first). acc_norm: the
argmax of summed log-probability / len(choice) in characters (without the leading space) is.
Requests are packed several to a row (data/packing.py: attention stays inside each request) and scored
from the final hidden states a chunk of positions at a time (adaptlab.losses), never full logits.

    python -c "from adaptlab.evaluate.choice import load_items; print(len(load_items('items.jsonl')))"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptlab.data.corpus import start_token
from adaptlab.data.example import IGNORE_INDEX
from adaptlab.data.packing import pack_rows, pack_sequences
from adaptlab.data.sources import read_jsonl
from adaptlab.errors import UserError
from adaptlab.evaluate.perplexity import Progress, model_device
from adaptlab.losses import next_token_nll

PACK_WIDTH = 256
"""Input tokens per packed row: several short choices share one row (attention kept inside each)."""


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class ChoiceScores:
    """Per-item results, aligned with the items (1.0 = right, 0.0 = wrong)."""

    acc: np.ndarray  # (N,)
    acc_norm: np.ndarray  # (N,)
    loglik: list[list[float]]  # summed log-probability per choice

    def to_json(self) -> dict[str, Any]:
        return {"acc": self.acc.tolist(), "acc_norm": self.acc_norm.tolist(), "loglik": self.loglik}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ChoiceScores:
        return cls(np.asarray(obj["acc"]), np.asarray(obj["acc_norm"]), obj["loglik"])


def validate_item(record: Any, where: str) -> Item:
    """One item, or a UserError naming file:line and what is wrong."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with question, choices, answer")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)} (need question, choices, answer)")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str):
        raise UserError(f"{where}: `question` must be a string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise UserError(f"{where}: `choices` must be a list of strings")
    if len(choices) < 2:
        raise UserError(
            f"{where}: `choices` has {len(choices)} entr{'y' if len(choices) == 1 else 'ies'}; need at least 2"
        )
    if any(len(c) == 0 for c in choices):
        raise UserError(f"{where}: `choices` holds an empty string")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise UserError(f"{where}: `answer` must be the 0-based index of the right choice (an integer)")
    if not 0 <= answer < len(choices):
        raise UserError(
            f"{where}: `answer` {answer} is out of range for {len(choices)} choices (0..{len(choices) - 1})"
        )
    return Item(question=question, choices=tuple(choices), answer=answer)


def load_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """Validated items of a JSONL file (the first `limit` when given)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--mc {path}: no such file (expected JSONL with question, choices, answer)")
    items: list[Item] = []
    for lineno, record in read_jsonl(p):
        if limit is not None and len(items) >= limit:
            break
        items.append(validate_item(record, f"{p}:{lineno}"))
    if not items:
        raise UserError(f"--mc {path}: no items")
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: encode the whole, split at the context's length."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:  # lm-eval conditions an empty context on BOS, else EOS
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(context + continuation)["input_ids"])
    context_enc = list(tokenizer(context)["input_ids"])
    return context_enc, whole[len(context_enc) :]


def requests(items: list[Item]) -> list[tuple[int, int, str, str]]:
    """(item, choice, context, continuation) for every choice of every item."""
    return [
        (i, j, f"{it.question}\nAnswer:", f" {choice}")
        for i, it in enumerate(items)
        for j, choice in enumerate(it.choices)
    ]


def score_items(
    model: Any,
    tokenizer: Any,
    items: list[Item],
    seq_len: int = 2048,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> ChoiceScores:
    """Summed continuation log-probability per choice, and acc / acc_norm per item."""
    rows = []  # (item, choice, input ids, number of continuation tokens)
    for i, j, ctx, cont in requests(items):
        ctx_enc, cont_enc = encode_pair(tokenizer, ctx, cont)
        whole = (ctx_enc + cont_enc)[-(seq_len + 1) :]
        rows.append((i, j, whole[:-1], whole[len(whole) - len(cont_enc) :]))
    loglik = [[0.0] * len(it.choices) for it in items]
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token(tokenizer)
    inputs = [r[2] for r in rows]
    targets = [[IGNORE_INDEX] * (len(r[2]) - len(r[3])) + list(r[3]) for r in rows]
    width = max(max(len(x) for x in inputs), min(seq_len, PACK_WIDTH))
    packed = pack_rows([len(x) for x in inputs], width)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(packed), batch_size):
                group = packed[lo : lo + batch_size]
                batch, spans = pack_sequences(inputs, targets, group, width, pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                nll = next_token_nll(model, batch, batch["targets"]).double()  # (B, T)
                for sp in spans:
                    i, j = rows[sp.item][0], rows[sp.item][1]
                    loglik[i][j] = -float(nll[sp.row, sp.start : sp.end].sum())
                if progress:
                    progress(int(batch["attention_mask"].sum()))
    finally:
        model.train(was_training)
    acc = np.zeros(len(items))
    acc_norm = np.zeros(len(items))
    for i, it in enumerate(items):
        lls = np.asarray(loglik[i])
        lengths = np.asarray([float(len(c)) for c in it.choices])
        acc[i] = float(int(np.argmax(lls)) == it.answer)
        acc_norm[i] = float(int(np.argmax(lls / lengths)) == it.answer)
    return ChoiceScores(acc=acc, acc_norm=acc_norm, loglik=loglik)


def summarize(scores: ChoiceScores) -> dict[str, float | int]:
    return {"acc": float(scores.acc.mean()), "acc_norm": float(scores.acc_norm.mean()), "n": len(scores.acc)}
