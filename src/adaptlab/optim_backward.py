"""Optimizer in backward: each parameter's AdamW update applied as soon as its gradient is complete.

A plain step holds every gradient until `optimizer.step()`: for full fine-tuning that is 4 bytes a
parameter (540 MB on smollm2-135m) on top of the weights and AdamW's two moments, and at short
sequences it is what sets the peak. Here a hook on each trainable parameter (torch's post-accumulate-
grad hook) steps the run's own optimizer the moment autograd has finished that parameter's gradient,
then frees the gradient; the next gradient takes its blocks. Only the largest single gradient (the
tied embedding's) is alive at once, beside what backward still holds.

The update is the optimizer's own: while the hook runs, the parameter is the only one with a gradient,
so `optimizer.step()` (fused AdamW, its per-parameter step count, the scheduler's learning rate of
this step) updates it and nothing else, and checkpoints and resumes keep the optimizer's state dict
as they are. Global-norm clipping needs every gradient before the first update, so the config refuses
it (config.py); the global norm is still measured, a parameter at a time, for the log and the health
check. Under gradient accumulation the hooks act only in the last micro-batch's backward, after the
earlier ones have accumulated into `.grad` (so accumulation keeps the gradients between micro-batches
and saves only in the last one). One process: DDP and FSDP2 reduce gradients after autograd has
finished them, which these hooks would run ahead of.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from adaptlab.errors import UserError


def check_one_process(enabled: bool, processes: int) -> None:
    """Refuse optimizer_in_backward on more than one process (its hooks would run ahead of the reduction)."""
    if enabled and processes > 1:
        raise UserError(
            f"optimizer_in_backward runs in one process, not {processes}: DDP and FSDP2 reduce each "
            "gradient after backward has finished it. Drop --optimizer-in-backward or train on one process"
        )


class BackwardUpdates:
    """Hooks that update each parameter of `params` inside backward while armed, then free its gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.armed = False
        self._params = list(params)
        self._group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._sq_norm: torch.Tensor | None = None
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._update)

    def _update(self, param: torch.Tensor) -> None:
        if not self.armed:  # an earlier micro-batch of an accumulated step: keep accumulating
            return
        self._add_norm(param)
        self._step_only(param)
        param.grad = None

    def _add_norm(self, param: torch.Tensor) -> None:
        assert param.grad is not None
        sq = torch.linalg.vector_norm(param.grad, dtype=torch.float32).double() ** 2
        self._sq_norm = sq if self._sq_norm is None else self._sq_norm + sq.to(self._sq_norm.device)

    def _step_only(self, param: torch.Tensor) -> None:
        """optimizer.step() over `param` alone: the others may still hold earlier micro-batches' gradients."""
        groups = self.optimizer.param_groups
        kept = [group["params"] for group in groups]
        mine = self._group_of[id(param)]
        try:
            for i, group in enumerate(groups):
                group["params"] = [param] if i == mine else []
            self.optimizer.step()
        finally:
            for group, params in zip(groups, kept, strict=True):
                group["params"] = params

    def finish(self) -> float:
        """After the step's last backward: update any parameter it did not reach; the step's global norm.

        A parameter that took a gradient only in an earlier micro-batch still holds it here.
        """
        left = [p for p in self._params if p.grad is not None]
        for p in left:
            self._add_norm(p)
        if left:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        norm = 0.0 if self._sq_norm is None else float(self._sq_norm.sqrt())
        self._sq_norm = None
        return norm
