"""Preference pairs for DPO: JSONL rows of prompt, chosen and rejected -> token pairs with response labels.

A row is either plain strings, `{"prompt": "...", "chosen": "...", "rejected": "..."}`, or TRL's
conversational form: `prompt` a list of {role, content} messages and `chosen` / `rejected` one
assistant message each (`[{"role": "assistant", "content": "..."}]`). Rows render through the
tokenizer's chat template like instruction records (data/instruct.py): a string prompt is the user's
turn, a string response the assistant's. As in TRL, the response starts where the tokenized prompt
and the tokenized prompt + response first differ (the shorter of the two pairs' prefixes), and a
pair longer than seq_len is cut from the right; a prompt that leaves no room for a response is
refused. Pairs split into train/val/test by a stable hash of their id (data/corpus.py), as
documents do; the default id is `folder/file.jsonl:line`.

    python -c "from adaptlab.data.preference import read_pairs as r; \
print(r(['../shared/data/preference/wordnet_define_pairs.jsonl'])[0])"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptlab.config import RunConfig
from adaptlab.data.corpus import split_documents
from adaptlab.data.example import IGNORE_INDEX, Example, collate
from adaptlab.data.instruct import _common_prefix, render_chat
from adaptlab.data.sources import _portable_name, local_files, read_jsonl
from adaptlab.errors import UserError

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant", "tool")
"""Roles a conversational prompt's messages may take (the roles chat templates render)."""
Message = dict[str, str]


@dataclass(frozen=True)
class PreferenceRecord:
    """One row as read: the prompt's messages and the two assistant responses."""

    id: str
    where: str
    """file:line, for errors."""
    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message


@dataclass
class PreferencePair:
    """One tokenized pair: prompt + chosen and prompt + rejected, labels on the response tokens only."""

    chosen: Example
    rejected: Example


def read_pairs(sources: list[str]) -> list[PreferenceRecord]:
    """Every preference row of the JSONL files the sources name, in a stable order."""
    records: list[PreferenceRecord] = []
    for source in sources:
        files = local_files(source)
        if files is None:
            raise UserError(
                f"data {source!r}: preference data must be local JSONL files (prompt, chosen, rejected)"
            )
        for path in files:
            if path.suffix != ".jsonl":
                raise UserError(f"{path}: preference data must be JSONL with prompt, chosen and rejected")
            records.extend(_file_records(path))
        if not records:
            raise UserError(f"data {source!r}: no preference rows")
    return records


def _file_records(path: Path) -> list[PreferenceRecord]:
    name = _portable_name(path)
    return [_record(row, f"{path}:{lineno}", f"{name}:{lineno}") for lineno, row in read_jsonl(path)]


def _record(row: Any, where: str, default_id: str) -> PreferenceRecord:
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: expected a JSON object with prompt, chosen and rejected, got {type(row).__name__}"
        )
    missing = [f for f in FIELDS if f not in row]
    if missing:
        keys = ", ".join(sorted(row)) or "none"
        raise UserError(
            f"{where}: no field {missing[0]!r} (fields: {keys}); a preference row needs prompt, chosen, rejected"
        )
    record = PreferenceRecord(
        id=str(row.get("id", default_id)),
        where=where,
        prompt=_prompt(row["prompt"], where),
        chosen=_response(row["chosen"], "chosen", where),
        rejected=_response(row["rejected"], "rejected", where),
    )
    if record.chosen["content"] == record.rejected["content"]:  # its loss stays at ln 2, its gradient ~0
        raise UserError(
            f"{where}: `chosen` and `rejected` are the same response, which teaches no preference"
        )
    return record


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def _prompt(value: Any, where: str) -> tuple[Message, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        for m in value:
            if m["role"] not in ROLES:
                raise UserError(
                    f"{where}: unknown role {m['role']!r} in `prompt`; a message's role is one of {', '.join(ROLES)}"
                )
        return tuple({"role": m["role"], "content": m["content"]} for m in value)
    raise UserError(f"{where}: `prompt` must be a string or a non-empty list of {{role, content}} strings")


def _response(value: Any, field: str, where: str) -> Message:
    message = {"role": "assistant", "content": value} if isinstance(value, str) else None
    if message is None:
        given = value[0] if isinstance(value, list) and len(value) == 1 else value
        if not (_is_message(given) and given["role"] == "assistant"):
            raise UserError(
                f"{where}: `{field}` must be a string or one assistant message [{{role, content}}]"
            )
        message = {"role": "assistant", "content": given["content"]}
    if not message["content"].strip():
        raise UserError(f"{where}: `{field}` is empty: a preference pair needs two responses to rank")
    return message


def tokenize_pair(record: PreferenceRecord, tokenizer: Any, seq_len: int) -> PreferencePair:
    """The pair's token rows; the prompt is the common prefix of prompt and prompt + response (as TRL)."""
    prompt_text, chosen_text = render_chat([*record.prompt, record.chosen], tokenizer)
    _, rejected_text = render_chat([*record.prompt, record.rejected], tokenizer)
    prompt, chosen, rejected = (
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, chosen_text, rejected_text)
    )
    n_prompt = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if n_prompt >= seq_len:
        raise UserError(
            f"{record.where}: the prompt is {n_prompt} tokens, which leaves no room for a response within "
            f"--seq-len {seq_len}: raise --seq-len or shorten the prompt"
        )
    return PreferencePair(
        _response_row(chosen, n_prompt, seq_len), _response_row(rejected, n_prompt, seq_len)
    )


def _response_row(ids: list[int], n_prompt: int, seq_len: int) -> Example:
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Example(ids[:seq_len], labels[:seq_len])


def preference_pairs(config: RunConfig, tokenizer: Any) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and validation pairs of config.data: as many train pairs as the budget uses (seeded order)."""
    records = read_pairs(config.data.train)
    d, t = config.data, config.train
    train = split_documents(records, "train", d.val_frac, d.test_frac)  # type: ignore[arg-type]
    val = split_documents(records, "val", d.val_frac, d.test_frac)  # type: ignore[arg-type]
    if not train:
        raise UserError(f"data {', '.join(d.train)}: no preference row lands in the train split")
    n_train = t.total_steps() * t.batch * t.grad_accum
    return _tokenized(train, tokenizer, t.seq_len, t.seed, n_train), _tokenized(
        val, tokenizer, t.seq_len, 0, t.eval_examples
    )


def _tokenized(
    records: list[Any], tokenizer: Any, seq_len: int, seed: int, limit: int
) -> list[PreferencePair]:
    """The first `limit` records in a seeded order, tokenized (a short budget tokenizes only what it uses)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    return [tokenize_pair(records[i], tokenizer, seq_len) for i in order[:limit]]


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the B chosen rows then the B rejected ones (as TRL): input_ids, attention_mask, labels."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
