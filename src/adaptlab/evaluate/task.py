"""Task accuracy on held-out prompts of a verifiable task: pass@1 (greedy) and mean reward over k samples.

The prompts are the test split of a task (data/tasks.py: the embedded `arithmetic` or a JSONL file
of prompt/answer rows), rendered with the chat template; completions are scored by a reward
(data/rewards.py, default `exact`). pass@1 is the mean reward of the greedy completion (the share
answered right, for a 0/1 reward); mean@k is the mean reward over k completions sampled at
temperature 1 with a fixed seed. Both are per-item figures, so a tuned model and its base get a
paired bootstrap interval of their difference (stats.py), as every other section of `evaluate`.

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
from adaptlab.data.tasks import load_task, render_prompt_ids, split_items
from adaptlab.errors import UserError
from adaptlab.evaluate import stats
from adaptlab.sampling import sample

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


def _eos_and_pad(model: Any, tokenizer: Any) -> tuple[set[int], int]:
    from adaptlab.objectives.grpo import eos_ids, pad_id

    return eos_ids(model, tokenizer), pad_id(tokenizer)


def _ids(p: Any, tokenizer: Any) -> tuple[int, ...]:
    ids = getattr(p, "ids", ())
    return tuple(ids) if ids else tuple(render_prompt_ids(p.prompt, tokenizer))


def completion_rewards(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    reward: Reward,
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    batch: int,
    seed: int = 0,
) -> np.ndarray:
    """Rewards (len(prompts), n) of n completions per prompt (greedy when temperature is 0).

    `prompts` are items with .prompt, .answer and optionally .ids (token ids; rendered when absent).
    """
    eos, pad = _eos_and_pad(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    per_call = max(1, batch // n)
    out = np.zeros((len(prompts), n))
    for lo in range(0, len(prompts), per_call):
        chunk = prompts[lo : lo + per_call]
        s = sample(
            model,
            [_ids(p, tokenizer) for p in chunk],
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_ids=eos,
            pad_id=pad,
            generator=generator,
        )
        for row, (i, ids) in enumerate(zip(s.prompt_index, s.completions, strict=True)):
            item = getattr(chunk[i], "item", chunk[i])
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out[lo + i, row % n] = reward(item.prompt, text, item.answer)
    return out


def greedy_accuracy(
    model: Any, tokenizer: Any, prompts: Sequence[Any], reward: Reward, max_new_tokens: int, batch: int
) -> float:
    """Mean reward of the greedy completion of each prompt (pass@1 for a 0/1 reward)."""
    r = completion_rewards(
        model, tokenizer, prompts, reward, n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch=batch
    )
    return float(r.mean())


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


def task_section(
    tuned: TaskScores, base: TaskScores | None, n_resamples: int = stats.N_RESAMPLES
) -> dict[str, Any]:
    """evaluate()'s "task" figures (without name and reward): summary, base and paired deltas."""
    section: dict[str, Any] = {"n": len(tuned.pass1), "k": tuned.k, **tuned.summary()}
    if base is not None:
        section["base"] = base.summary()
        section["delta"] = stats.item_deltas(
            [
                ("pass1", "pass1_ci95", tuned.pass1, base.pass1),
                ("mean_reward_k", "mean_reward_k_ci95", tuned.mean_k, base.mean_k),
            ],
            n_resamples,
        )
    return section
