"""Task accuracy on held-out prompts of a verifiable task: pass@1 (greedy) and mean reward over k samples.

The prompts are the test split of a task (data/tasks.py: the embedded `arithmetic` or a JSONL file
of prompt/answer rows), rendered with the chat template; completions are scored by a reward
(data/rewards.py, default `exact`). pass@1 is the mean reward of the greedy completion (the share
answered right, for a 0/1 reward); mean@k is the mean reward over k completions sampled at
temperature 1 with a fixed seed. Both are per-item figures, so a tuned model and its base get a
paired interval of their difference (stats.item_deltas), as every other section of `evaluate`.

Section of evaluate()'s JSON (base and delta when a base is compared):

    "task": {"name": str, "reward": str, "n": n, "k": k, "pass1": f, "mean_reward_k": f,
             "base": {"pass1": f, "mean_reward_k": f},
             "delta": {"pass1": f, "pass1_ci95": [lo, hi], "mean_reward_k": f, "mean_reward_k_ci95": [lo, hi]}}

    python -c "from adaptlab.models import load_model as l; from adaptlab.evaluate.task import *; \\
m = l('tiny-random'); print(score_task(m.model, m.tokenizer, task_items('arithmetic', limit=4), k=2).to_json())"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptlab.data.rewards import Reward, load_reward
from adaptlab.data.tasks import load_task, split_items
from adaptlab.errors import UserError
from adaptlab.evaluate import stats
from adaptlab.objectives.scoring import completion_rewards

MAX_NEW_TOKENS = 32
DEFAULT_K = 4


@dataclass
class TaskPrompt:
    """What scoring needs of a task item: its text, answer and prompt token ids."""

    prompt: str
    answer: str
    ids: tuple[int, ...] = ()


def task_items(source: str, limit: int | None = None) -> list[TaskPrompt]:
    """The held-out (test) items of a task, at most `limit`."""
    items = split_items(load_task(source), "test")
    if not items:
        raise UserError(f"task {source!r} has no held-out items (it needs at least 3 rows)")
    return [TaskPrompt(it.prompt, it.answer) for it in items[:limit]]


@dataclass
class TaskScores:
    """Per-item pass@1 (greedy reward) and mean reward over k samples."""

    pass1: np.ndarray  # (N,)
    mean_k: np.ndarray  # (N,)
    k: int

    def to_json(self) -> dict[str, Any]:
        return {"pass1": self.pass1.tolist(), "mean_k": self.mean_k.tolist(), "k": self.k}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TaskScores:
        return cls(
            np.asarray(d["pass1"], dtype=np.float64), np.asarray(d["mean_k"], dtype=np.float64), d["k"]
        )

    def summary(self) -> dict[str, float]:
        return {"pass1": float(self.pass1.mean()), "mean_reward_k": float(self.mean_k.mean())}


@torch.inference_mode()
def score_task(
    model: Any,
    tokenizer: Any,
    items: Sequence[TaskPrompt],
    reward: Reward | str = "exact",
    k: int = DEFAULT_K,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 32,
    seed: int = 0,
) -> TaskScores:
    """pass@1 and mean reward over k samples (temperature 1, seeded) of each item."""
    if k < 1:
        raise UserError(f"--task-k must be at least 1 (got {k})")
    fn = load_reward(reward) if isinstance(reward, str) else reward
    common = {"max_new_tokens": max_new_tokens, "batch": batch_size}
    greedy = completion_rewards(model, tokenizer, items, fn, n=1, temperature=0.0, **common)[:, 0]
    sampled = completion_rewards(model, tokenizer, items, fn, n=k, temperature=1.0, seed=seed, **common)
    return TaskScores(greedy, sampled.mean(axis=1), k)


def task_section(tuned: TaskScores, base: TaskScores | None) -> dict[str, Any]:
    """evaluate()'s "task" figures (without name and reward): summary, base and paired deltas."""
    section: dict[str, Any] = {"n": len(tuned.pass1), "k": tuned.k, **tuned.summary()}
    if base is not None:
        section["base"] = base.summary()
        section["delta"] = stats.item_deltas(
            [
                ("pass1", "pass1_ci95", tuned.pass1, base.pass1),
                ("mean_reward_k", "mean_reward_k_ci95", tuned.mean_k, base.mean_k),
            ]
        )
    return section
