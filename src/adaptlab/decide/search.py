"""The LR search: successive halving over LR candidates with Optuna's SuccessiveHalvingPruner.

Every candidate trains briefly (rung 0, the smallest budget); the pruner keeps the best fraction
(1 / reduction_factor) of them, which train at the next budget, and so on up the rungs. A rung is
trained as a whole (all its runs through the executor, in parallel where it can) before any decision,
then each trial reports its validation loss to Optuna in the candidates' order, prior first. Optuna's
pruner is asynchronous (ASHA): a trial is promoted when it is among the best 1 / reduction_factor of
the trials that reported at that rung before it, so the best value of every rung is always promoted
(and the prior, which reports first), and more than the fraction may be. So that a rung costs what
the design budgeted, at most ceil(n / reduction_factor) of the n trials at a rung go on: the best of
those the pruner promoted (which always include the rung's best). A diverged run (no finite loss) is
pruned.

The search is deterministic given the losses, so a resumed decision replays it from the finished
runs without training them again.

    python -c "from adaptlab.decide.search import successive_halving; help(successive_halving)"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

TrainRung = Callable[[list[float], int], dict[float, float | None]]
"""(candidates alive at this rung, rung index) -> each candidate's validation loss (None: failed)."""


@dataclass
class Search:
    """What the search trained and kept: per rung, each candidate's loss, and the winner."""

    candidates: list[float]
    rungs: list[dict[float, float | None]] = field(default_factory=list)
    promoted: list[list[float]] = field(default_factory=list)
    best: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "rungs": [
                {
                    "losses": [{"value": c, "loss": loss} for c, loss in rung.items()],
                    "promoted": self.promoted[i] if i < len(self.promoted) else [],
                }
                for i, rung in enumerate(self.rungs)
            ],
            "best": self.best,
        }


def prior_first(candidates: Sequence[float], prior: float) -> list[float]:
    """The candidates ordered by distance from the prior on a log scale (the prior first, ties upward)."""
    return sorted(candidates, key=lambda c: (round(abs(math.log(c / prior)), 9), -c))


def survivors(n: int, reduction_factor: int) -> int:
    """Trials that go on from a rung of n: ceil(n / reduction_factor)."""
    return max(1, math.ceil(n / reduction_factor))


def _at_most(kept: list[float], losses: dict[float, float | None], n: int) -> list[float]:
    """The n best of `kept` by loss, in their order."""
    best = set(sorted(kept, key=lambda c: losses[c])[:n])  # type: ignore[arg-type,return-value]
    return [c for c in kept if c in best]


def successive_halving(
    candidates: Sequence[float], n_rungs: int, train_rung: TrainRung, reduction_factor: int = 2
) -> Search:
    """Successive halving over `candidates` (in the order given: the first reports first) on `n_rungs`
    rungs; train_rung trains the live candidates at a rung and returns their losses. The best is the
    lowest loss at the last rung any candidate reached."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=reduction_factor, min_early_stopping_rate=0
    )
    study = optuna.create_study(direction="minimize", pruner=pruner, sampler=optuna.samplers.RandomSampler(0))
    dist = {"x": optuna.distributions.CategoricalDistribution(list(candidates))}
    trials = {}
    for c in candidates:
        study.enqueue_trial({"x": c})
        trials[c] = study.ask(dist)
    search = Search(list(candidates))
    alive = list(candidates)
    for k in range(n_rungs):
        losses = train_rung(alive, k)
        search.rungs.append({c: losses.get(c) for c in alive})
        last = k == n_rungs - 1
        kept = []
        for c in alive:
            loss = losses.get(c)
            value = loss if loss is not None and math.isfinite(loss) else math.nan
            trial = trials[c]
            trial.report(value, step=reduction_factor**k)
            if math.isnan(value):
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif last:
                study.tell(trial, value)
                kept.append(c)
            elif trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                kept.append(c)
        if not last:
            capped = _at_most(kept, losses, survivors(len(alive), reduction_factor))
            for c in kept:
                if c not in capped:
                    study.tell(trials[c], state=optuna.trial.TrialState.PRUNED)
            kept = capped
        search.promoted.append(kept)
        if not kept:
            break
        alive = kept
    for rung in reversed(search.rungs):
        finite = {c: v for c, v in rung.items() if v is not None and math.isfinite(v)}
        if finite:
            search.best = min(finite, key=lambda c: finite[c])
            break
    return search
