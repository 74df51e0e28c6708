"""Supervised fine-tuning: next-token cross-entropy on label tokens (packed text blocks or chat responses).

The loss of a step is the sum of token losses over the global batch divided by its number of label
tokens (summed over ranks), so batch 4 x accum 1 and batch 1 x accum 4 take the same step. The
data are the documents of config.data, split by document (data/corpus.py); validation reports the
mean per-token loss on the val split.

    adaptlab train --task sft --model tiny-random --data python-stdlib --steps 20 --out runs/sft
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from adaptlab import distributed as dist
from adaptlab import losses
from adaptlab.config import ObjectiveSpec, RunConfig
from adaptlab.data.corpus import IGNORE_INDEX, Example, build_examples, split_documents
from adaptlab.data.packing import collate_micro_batch
from adaptlab.data.sources import load_documents
from adaptlab.errors import UserError
from adaptlab.hardware import autocast
from adaptlab.objectives import rank_chunks, to_device

log = logging.getLogger(__name__)


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, and their count (chunked: no full logits)."""
    return losses.token_loss_sum(model, batch)


def sft_examples(config: RunConfig, tokenizer: Any) -> tuple[list[Example], list[Example]]:
    """Train and validation examples of config.data: as many train examples as the budget uses."""
    docs = load_documents(config.data.train, config.data.text_field)
    train_docs = split_documents(docs, "train", config.data.val_frac, config.data.test_frac)
    val_docs = split_documents(docs, "val", config.data.val_frac, config.data.test_frac)
    if not train_docs:
        raise UserError(f"data {', '.join(config.data.train)}: no document lands in the train split")
    t = config.train
    train = build_examples(
        train_docs, tokenizer, t.seq_len, seed=t.seed, max_examples=t.total_steps() * t.batch * t.grad_accum
    )
    val = (
        build_examples(val_docs, tokenizer, t.seq_len, seed=0, max_examples=t.eval_examples, split="val")
        if val_docs
        else []
    )
    return train, val


@torch.inference_mode()
def validation_loss(setup: Any) -> float | None:
    """Mean per-token loss over the validation examples."""
    if not setup.val_examples:
        return None
    was_training = setup.model.training
    setup.model.eval()
    total, count = 0.0, 0
    pad = setup.tokenizer.pad_token_id
    bs = setup.config.train.batch
    with autocast(setup.device, setup.precision):
        for i in range(0, len(setup.val_examples), bs):
            loss, n = token_loss_sum(
                setup.model, to_device(collate_micro_batch(setup.val_examples[i : i + bs], pad), setup.device)
            )
            total, count = total + float(loss), count + n
    setup.model.train(was_training)
    return total / max(count, 1)


class SFTObjective:
    """Next-token cross-entropy, normalised by the label tokens of the global batch."""

    name = "sft"

    def __init__(self, spec: ObjectiveSpec | None = None) -> None:
        self.spec = spec

    def build_data(self, config: RunConfig, tokenizer: Any) -> tuple[list[Example], list[Example]]:
        train, val = sft_examples(config, tokenizer)
        if train and not any(any(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in train):
            log.warning(
                "no training example keeps a token to learn within --seq-len %d: every prompt fills the "
                "window before its response starts, so the loss is 0 and nothing is learned; raise "
                "--seq-len or shorten the prompts",
                config.train.seq_len,
            )
        return train, val

    def prepare(self, setup: Any) -> None:
        return None

    def micro_batches(self, setup: Any, step: int) -> list[dict[str, torch.Tensor]]:
        pad = setup.tokenizer.pad_token_id
        return [
            collate_micro_batch([setup.train_examples[i] for i in chunk], pad)
            for chunk in rank_chunks(setup, step)
        ]

    def normaliser(self, setup: Any, micro: list[dict[str, torch.Tensor]]) -> float:
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        return int(dist.all_reduce_sum(local, setup.device))

    def loss(self, setup: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss_sum, _ = token_loss_sum(setup.model, batch)
        return loss_sum, {}

    def validation(self, setup: Any) -> dict[str, float]:
        val_loss = validation_loss(setup)
        return {} if val_loss is None else {"val_loss": val_loss}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
