"""Padding-free packing: several documents per row, attention kept inside each document.

A packed row holds whole sequences one after the other, each with position ids that restart at 0.
The model gets `position_ids` and no attention mask: transformers then builds a block-diagonal
causal mask from where the positions restart (SDPA, on any device) or runs flash-attention's varlen
kernel (models loaded with attn_implementation="flash_attention_2" on CUDA), so no token attends
across a document boundary and every document is scored exactly as it would be alone. The tail of a
row that nothing fits into is padding with its own positions and no target.

Rows are filled first-fit in decreasing length order, so a batch of short instruction rows or short
documents costs about its real tokens instead of rows x the longest.

    python -c "from adaptlab.data.packing import pack_rows; print(pack_rows([5, 3, 2, 4], 8))"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptlab.data.example import IGNORE_INDEX, Example, collate


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the items in each row, first-fit decreasing; no row holds more than `capacity`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than a row's {capacity}")
        row = next((r for r, room in enumerate(free) if room >= n), None)
        if row is None:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[row].append(i)
            free[row] -= n
    return rows


def _positions(lengths: list[int], width: int) -> list[int]:
    pos = [p for n in lengths for p in range(n)]
    return pos + list(range(width - len(pos)))  # the padding tail counts as one more sequence


def collate_packed(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Training rows packed to the width of the longest example: input_ids, labels, position_ids,
    attention_mask (1 on real tokens; counts tokens, not passed to the model).

    Labels keep the training convention (position t is scored on labels[t + 1]); each example's first
    label is IGNORE_INDEX, so the last token of one example is never scored on the next one's start.
    """
    width = max(len(e.input_ids) for e in examples)
    rows = pack_rows([len(e.input_ids) for e in examples], width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(e.labels[1:n])
            at += n
        mask[r, :at] = 1
        positions[r] = torch.tensor(_positions([len(examples[i].input_ids) for i in members], width))
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def collate_micro_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A training micro-batch: packed when that saves rows (rows of different lengths), else padded.

    Equal-length rows (packed text blocks) keep the plain layout, so their step is unchanged.
    """
    lengths = [len(e.input_ids) for e in examples]
    if len(set(lengths)) > 1 and len(pack_rows(lengths, max(lengths))) < len(examples):
        return collate_packed(examples, pad_id)
    return collate(examples, pad_id)


@dataclass
class Span:
    """Where one sequence lies in a packed batch: row, first and end (exclusive) column."""

    item: int
    row: int
    start: int
    end: int


def pack_sequences(
    inputs: list[list[int]], targets: list[list[int]], rows: list[list[int]], width: int, pad_id: int
) -> tuple[dict[str, torch.Tensor], list[Span]]:
    """Evaluation batch of the given packed rows: input_ids, position_ids, targets (aligned with the
    positions: targets[r, t] is what position t predicts, IGNORE_INDEX where nothing is scored),
    attention_mask (1 on real tokens), and each sequence's span."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    spans = []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(inputs[i])
            ids[r, at : at + n] = torch.tensor(inputs[i])
            tgt[r, at : at + n] = torch.tensor(targets[i])
            spans.append(Span(i, r, at, at + n))
            at += n
        mask[r, :at] = 1
        positions[r] = torch.tensor(_positions([len(inputs[i]) for i in members], width))
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "targets": tgt}
    return batch, spans
