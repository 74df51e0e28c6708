"""Rewards of sampled completions: n completions of each prompt, scored by a task's reward. GRPO's
held-out accuracy during training and the task evaluation (evaluate/task.py) both read them.

    python -c "from adaptlab.models import load_model as l; from adaptlab.data.tasks import *; \\
from adaptlab.data.rewards import exact_reward as r; from adaptlab.objectives.scoring import *; \\
m = l('tiny-random'); print(greedy_accuracy(m.model, m.tokenizer, split_items(load_task('arithmetic'), \\
'test')[:4], r, 4, 4))"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from adaptlab.data.rewards import Reward
from adaptlab.data.tasks import render_prompt_ids
from adaptlab.sampling import sample


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _eos_and_pad(model: Any, tokenizer: Any) -> tuple[set[int], int]:
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
