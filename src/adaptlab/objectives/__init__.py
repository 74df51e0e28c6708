"""What a training step minimises: sft (next-token), dpo (preference pairs), grpo (sampled rewards).

adaptlab.train's loop is the same for every objective; it asks the run's Objective for the data and the
loss of each step and does the rest (accumulation, clipping, the update, checkpoints, logging):

    objective = objective_for(config)
    train, val = objective.build_data(config, tokenizer)   # rows of the objective's own kind
    objective.prepare(setup)                                # once, model and data built (reference log-probs)
    for step ...:
        micro = objective.micro_batches(setup, step)        # this rank's share of global batch `step`
        n = objective.normaliser(setup, micro)              # the global batch's count, summed over ranks
        for batch in micro:
            loss_sum, sums = objective.loss(setup, batch)   # summed over the micro-batch's units
            (loss_sum / n).backward()                       # the step's loss is the global-batch mean
    objective.validation(setup)                             # {"val_loss": ..., ...} on held-out rows

Contract of a micro-batch: a dict of tensors on the CPU that holds at least `attention_mask` (its
ones are the tokens a step counts); the loop moves it to the device before `loss`. `loss` returns
the loss summed over the micro-batch's units (label tokens for sft, pairs for dpo, completions or
tokens for grpo) and metric sums over the same units; the loop sums both over micro-batches and
ranks and divides by `normaliser`, so a step's loss and metrics are global-batch means however the
batch is cut. `state_dict` is JSON-serialisable and goes into each checkpoint's state.json, so a
resumed run continues bit-for-bit (an objective that samples keeps its RNG there).

    python -c "from adaptlab.config import RunConfig; from adaptlab.objectives import objective_for; \
print(objective_for(RunConfig()).name)"
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from adaptlab.errors import UserError

if TYPE_CHECKING:
    import torch

    from adaptlab.config import RunConfig

TASKS: dict[str, str] = {
    "sft": "adaptlab.objectives.sft:SFTObjective",
    "dpo": "adaptlab.objectives.dpo:DPOObjective",
    "grpo": "adaptlab.objectives.grpo:GRPOObjective",
}
"""Each task's objective class, imported when a run asks for it."""


class Objective(Protocol):
    """What one task's training step minimises, and the data and metrics that go with it."""

    name: str
    """sft | dpo | grpo (config.objective.task)."""

    def build_data(self, config: RunConfig, tokenizer: Any) -> tuple[list[Any], list[Any]]:
        """The train and validation rows (the objective's own kind: Example, PreferencePair, ...)."""
        ...

    def prepare(self, setup: Any) -> None:
        """Once, after the model and data are built (and the model wrapped), before the first step."""
        ...

    def micro_batches(self, setup: Any, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's share of the global batch of `step` (0-based), as collated micro-batches."""
        ...

    def normaliser(self, setup: Any, micro: list[dict[str, torch.Tensor]]) -> float:
        """The global batch's count of loss units (summed over ranks): each micro loss is divided by it."""
        ...

    def loss(self, setup: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss summed over the micro-batch's units (with its graph), and metric sums over them."""
        ...

    def validation(self, setup: Any) -> dict[str, float]:
        """Validation metrics on the held-out rows (sft: val_loss); empty when there are none."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state a resume needs to continue bit-for-bit (empty when none)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def batch_indices(step: int, n_rows: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of the global batch of `step` (0-based), cycling epochs in seeded orders.

    Epoch e uses randperm(n_rows, seed + e), so the order is a pure function of (seed, step) and a
    resumed run sees exactly the rows an uninterrupted one would.
    """
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, within = divmod(pos, n_rows)
        out.append(_epoch_order(n_rows, seed + epoch)[within])
    return out


_ORDER_CACHE: dict[tuple[int, int], list[int]] = {}


def _epoch_order(n: int, seed: int) -> list[int]:
    import torch

    key = (n, seed)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _ORDER_CACHE[key]


def rank_chunks(setup: Any, step: int) -> list[list[int]]:
    """Row indices of this rank's micro-batches of global batch `step`.

    One process: grad_accum chunks of `batch` rows. N ranks: rank r's contiguous 1/N of the same
    global batch, cut into chunks of at most `batch`.
    """
    from adaptlab import distributed as dist

    t = setup.config.train
    idx = batch_indices(step, len(setup.train_examples), t.batch * t.grad_accum, t.seed)
    return dist.micro_batches(dist.rank_slice(idx, setup.world), t.batch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def objective_for(config: RunConfig) -> Objective:
    """The objective of `config.objective.task`, built from its settings."""
    task = config.objective.task
    module_name, _, class_name = TASKS[task].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise UserError(f"--task {task} is not available in this version of adaptlab") from err
    return getattr(module, class_name)(config.objective)
