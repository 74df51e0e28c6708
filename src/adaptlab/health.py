"""Is training still healthy? Divergence (a non-finite loss or gradient) and collapse, step by step.

A collapsed model has stopped learning for good: its loss sits at the uniform-output level ln(vocab)
after it had been below it, or its gradient norm is zero, for COLLAPSE_STEPS steps in a row (a
learning rate far too high does this: `adaptlab train --method full --lr 1e6`). Either stops the run.

The loss of step s is computed on the weights the step s-1 left, so when step s is the first bad
one, the checkpoint of step s-1 already holds bad weights: `bad_from` says which checkpoints to drop
so that a resume starts from good ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adaptlab.errors import UserError

COLLAPSE_STEPS = 3
"""Consecutive collapsed steps that stop a run (one step at a zero gradient can be a fluke)."""
UNIFORM_TOL = 0.01
"""Nats from ln(vocab) within which a loss counts as the uniform-output level."""
LEARNED_MARGIN = 1.0
"""A loss at the uniform level counts only once the run was this far below it: a random init is not,
nor a randomly initialised model whose loss wanders a few tenths below the uniform level and back
(tiny-random on python-stdlib at the LoRA default LR, after about 190 steps)."""
ZERO_GRAD = 1e-12


class TrainingDiverged(UserError):
    """The loss or gradient became non-finite; the last good checkpoint is kept."""


class TrainingCollapsed(UserError):
    """The model collapsed (uniform output or zero gradient for several steps); the last good checkpoint is kept."""


@dataclass
class Health:
    """Watches each step's loss and gradient norm; says when the run must stop and since which step."""

    vocab_size: int
    streak_start: int | None = None
    """First step of the current run of collapsed steps (or the diverged step)."""
    best_loss: float = math.inf

    @property
    def uniform_loss(self) -> float:
        return math.log(self.vocab_size)

    def check(self, step: int, loss: float, grad_norm: float, labels: int = 1) -> UserError | None:
        """Why the run must stop at `step` (1-based), as the error to raise, or None while it may go on."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.streak_start = step
            return TrainingDiverged(
                f"training diverged at step {step} (loss {loss:.4g}, grad norm {grad_norm:.4g})"
            )
        collapsed = labels > 0 and (grad_norm <= ZERO_GRAD or self._at_uniform(loss))
        self.best_loss = min(self.best_loss, loss)
        if not collapsed:
            self.streak_start = None
            return None
        if self.streak_start is None:
            self.streak_start = step
        if step - self.streak_start + 1 < COLLAPSE_STEPS:
            return None
        return TrainingCollapsed(
            f"training collapsed at step {step} (loss {loss:.4f}; uniform output is ln {self.vocab_size} = "
            f"{self.uniform_loss:.4f}; grad norm {grad_norm:.3g}; since step {self.streak_start})"
        )

    def _at_uniform(self, loss: float) -> bool:
        return (
            abs(loss - self.uniform_loss) <= UNIFORM_TOL
            and self.best_loss < self.uniform_loss - LEARNED_MARGIN
        )

    def bad_from(self) -> int | None:
        """Checkpoints of this step or later hold suspect weights (None: none is suspect)."""
        return None if self.streak_start is None else self.streak_start - 1


def advice(run_root: str, peak_lr: float, precision: str) -> str:
    """What to do after a run stopped, in flags the run accepts."""
    text = f"Resume with a lower learning rate: `adaptlab train --resume {run_root} --lr {peak_lr / 10:.3g}`"
    if precision != "fp32":
        text += " (or train again with --precision fp32)"
    return text
