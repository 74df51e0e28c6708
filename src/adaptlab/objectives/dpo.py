"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023), as TRL defines them.

For each pair the policy's log-probabilities of the chosen and the rejected response (summed over
response tokens) are compared with the reference's: the implicit rewards are
beta x (log pi(y|x) - log pi_ref(y|x)), and the losses are

    sigmoid: -log sigmoid(beta x ((lp_c - ref_c) - (lp_r - ref_r)))
    ipo:     (((lp_c - ref_c) / n_c - (lp_r - ref_r) / n_r) - 1 / (2 beta))^2   (n: response tokens)

The reference is the base itself: for the LoRA family the same model with the adapter disabled
(no second copy in memory; for QLoRA the 4-bit base); for full fine-tuning the log-probs of the
untouched model, computed once before the first step and kept in RUN/reference_logps.safetensors,
so a resume reads them instead of recomputing them from trained weights.

A micro-batch holds B pairs as 2B rows (chosen rows, then rejected rows, as TRL concatenates them);
the step's loss and metrics are means over the pairs of the global batch. Metrics (TRL's names):
rewards/chosen, rewards/rejected, rewards/accuracies (chosen reward above rejected), rewards/margins,
logps/chosen, logps/rejected; validation reports them on held-out pairs with a `val_` prefix.

    adaptlab train --task dpo --method lora --data pairs.jsonl --beta 0.1 --steps 50 --out runs/dpo
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from adaptlab import distributed as dist
from adaptlab.config import ObjectiveSpec, RunConfig
from adaptlab.data.example import IGNORE_INDEX
from adaptlab.data.preference import PreferencePair, collate_pairs, preference_pairs
from adaptlab.hardware import autocast
from adaptlab.objectives import rank_chunks, to_device

log = logging.getLogger(__name__)
REFERENCE_FILE = "reference_logps.safetensors"
"""Full fine-tuning's reference log-probs in the run directory: (pairs, 2) tensors `train` and `val`."""


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's log-probability of its label tokens, summed (rows,)."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits  # (rows, T, vocab)
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (rows, T): token t predicts t+1
    nll = F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view(labels.shape).sum(dim=1)


def dpo_losses(
    logps: torch.Tensor, ref_logps: torch.Tensor, lengths: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected rewards, from (2B,) log-probs [chosen; rejected].

    `lengths` are the response tokens of each row (IPO averages the log-ratios over them).
    """
    chosen_ratio, rejected_ratio = (logps - ref_logps).chunk(2)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:  # ipo
        n_chosen, n_rejected = lengths.clamp(min=1).chunk(2)
        losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_metric_sums(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps: torch.Tensor
) -> dict[str, float]:
    """Sums over the pairs of a micro-batch of TRL's DPO metrics (the loop divides by the pairs)."""
    chosen_logps, rejected_logps = logps.detach().chunk(2)
    return {
        "rewards/chosen": float(chosen_rewards.sum()),
        "rewards/rejected": float(rejected_rewards.sum()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().sum()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
        "logps/chosen": float(chosen_logps.sum()),
        "logps/rejected": float(rejected_logps.sum()),
    }


def adapter_disabled(model: Any) -> Any:
    """A context in which the LoRA-family model computes with its base alone."""
    return dist.unwrap(model).disable_adapter()


class DPOObjective:
    """DPO / IPO on preference pairs against the base as reference."""

    name = "dpo"

    def __init__(self, spec: ObjectiveSpec) -> None:
        self.spec = spec
        self.reference: dict[str, torch.Tensor] = {}
        """Full fine-tuning: (pairs, 2) reference log-probs [chosen, rejected] of `train` and `val`."""

    def build_data(
        self, config: RunConfig, tokenizer: Any
    ) -> tuple[list[PreferencePair], list[PreferencePair]]:
        return preference_pairs(config, tokenizer)

    def prepare(self, setup: Any) -> None:
        if setup.config.method.is_lora:
            return  # the reference is the adapter-disabled model, computed with each batch
        self.reference = load_or_compute_reference(setup)

    def micro_batches(self, setup: Any, step: int) -> list[dict[str, torch.Tensor]]:
        return [self._batch(setup, chunk, "train") for chunk in rank_chunks(setup, step)]

    def _batch(self, setup: Any, idx: list[int], split: str) -> dict[str, torch.Tensor]:
        rows = setup.train_examples if split == "train" else setup.val_examples
        batch = collate_pairs([rows[i] for i in idx], setup.tokenizer.pad_token_id)
        if split in self.reference:
            ref = self.reference[split][idx]  # (B, 2)
            batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        return batch

    def normaliser(self, setup: Any, micro: list[dict[str, torch.Tensor]]) -> float:
        return dist.all_reduce_sum(sum(b["input_ids"].shape[0] // 2 for b in micro), setup.device)

    def loss(self, setup: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "ref_logps" in batch:
            ref_logps = batch["ref_logps"]
        else:  # before the policy's forward, so its transient logits are gone before activations pile up
            with torch.no_grad(), adapter_disabled(setup.model):
                ref_logps = sequence_logps(setup.model, batch)
        logps = sequence_logps(setup.model, batch)
        lengths = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            logps, ref_logps, lengths, self.spec.beta, self.spec.loss
        )
        return losses.sum(), pair_metric_sums(chosen_rewards, rejected_rewards, logps)

    @torch.no_grad()  # not inference_mode: FSDP2 must not allocate its unsharded weights as inference tensors
    def validation(self, setup: Any) -> dict[str, float]:
        """Mean loss and DPO metrics over the held-out pairs, prefixed `val_`."""
        if not setup.val_examples:
            return {}
        was_training = setup.model.training
        setup.model.eval()
        total, sums = 0.0, {}
        bs = setup.config.train.batch
        with autocast(setup.device, setup.precision):
            for start in range(0, len(setup.val_examples), bs):
                idx = list(range(start, min(start + bs, len(setup.val_examples))))
                loss, metrics = self.loss(setup, to_device(self._batch(setup, idx, "val"), setup.device))
                total += float(loss)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
        setup.model.train(was_training)
        n = len(setup.val_examples)
        return {"val_loss": total / n, **{f"val_{k}": v / n for k, v in sums.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def load_or_compute_reference(setup: Any) -> dict[str, torch.Tensor]:
    """The run's reference log-probs: read from the run directory, or computed now from the untouched model.

    A fresh run computes them before its first step and rank 0 writes them; a resume reads that file,
    so the reference never comes from trained weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = setup.run.root / REFERENCE_FILE
    sizes = {"train": len(setup.train_examples), "val": len(setup.val_examples)}
    if path.exists():
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError) as err:  # cut short or overwritten: it is adaptlab's own cache
            log.warning("%s is damaged (%s): computing the reference log-probs again", path, err)
            stored = {}
        if stored and {k: v.shape[0] for k, v in stored.items()} == sizes:
            return stored
    reference = {split: _reference_logps(setup, split) for split, n in sizes.items()}
    if setup.world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in reference.items()}, str(tmp))
        tmp.replace(path)
    dist.barrier()
    return reference


@torch.no_grad()  # not inference_mode: under FSDP2 this is the first forward, which allocates its buffers
def _reference_logps(setup: Any, split: str) -> torch.Tensor:
    """(pairs, 2) log-probs [chosen, rejected] of a split's pairs under the model as it is now.

    Each rank scores every world_size-th pair and one all-reduce assembles the table. Every rank runs
    the same number of forwards (a short rank repeats a pair it does not keep), as FSDP's collectives need.
    """
    rows = setup.train_examples if split == "train" else setup.val_examples
    world = setup.world
    out = torch.zeros(len(rows), 2)
    mine = list(range(world.rank, len(rows), world.world_size))
    forwards = -(-len(rows) // world.world_size)  # the most any rank has
    was_training = setup.model.training
    setup.model.eval()
    bs = setup.config.train.batch
    with autocast(setup.device, setup.precision):
        for start in range(0, forwards, bs):
            keep = mine[start : start + bs]
            idx = keep + [0] * (min(bs, forwards - start) - len(keep))  # padding pairs, not kept
            pairs = [rows[i] for i in idx]
            batch = to_device(collate_pairs(pairs, setup.tokenizer.pad_token_id), setup.device)
            chosen, rejected = sequence_logps(setup.model, batch).float().cpu().chunk(2)
            out[keep, 0], out[keep, 1] = chosen[: len(keep)], rejected[: len(keep)]
    setup.model.train(was_training)
    return dist.all_reduce_tensor(out, setup.device) if world.world_size > 1 else out
