"""Batched sampling with a KV cache: many completions per prompt from one model, reproducibly.

`sample()` decodes `n` completions of each of a batch of prompts in one forward pass per token: the
prompts are left-padded so every row's next token sits in the last column, each prompt's forward pass
runs once and its KV cache is repeated for its n rows, the cache grows by one column per step, and
rows that produced an end token leave the batch (and the cache). Randomness
comes only from the `torch.Generator` passed in, so the same generator state, weights and prompts
give the same completions; GRPO seeds it from (seed, step) so a resumed run samples what an
uninterrupted one would. temperature 0 is greedy.

It returns, per completion, the log-probability of each chosen token under logits / temperature
(the distribution it was drawn from, before top-p), which GRPO uses as the sampling-time
log-probs of its importance ratio. serve/generation.py shares `left_pad`, `top_p_filter` and `next_token_logits`.

    python -c "import torch; from adaptlab.models import load_model; from adaptlab.sampling import sample; \\
m = load_model('tiny-random'); print(sample(m.model, [[1, 2, 3]], n=2, max_new_tokens=4, \\
temperature=1.0, eos_ids={2}, pad_id=2, generator=torch.Generator().manual_seed(0)).completions)"
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: (ids, attention mask), both (B, T) long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Probabilities (..., V) with everything outside the smallest set reaching top_p zeroed."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    return probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))


@dataclass
class Samples:
    """Completions of a batch of prompts: prompt p's j-th completion is row p * n + j."""

    prompt_index: list[int]
    completions: list[list[int]]
    """Chosen token ids, ending with the end token when the row stopped on one."""
    logprobs: list[list[float]]
    """log p(token) under logits / temperature (0.0 for greedy rows)."""
    finished: list[bool]
    """Whether the row stopped on an end token (else it reached max_new_tokens)."""


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, or one per row (a row's draws then do not depend on which other
rows share its batch: GRPO on N processes samples what one process would)."""


def _choose(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Generators, rows: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids (B,), their log-probs (B,)) from logits (B, V); rows: the row of each batch position."""
    if temperature <= 0:
        return logits.argmax(-1), torch.zeros(logits.size(0))
    logp = torch.log_softmax(logits / temperature, dim=-1)
    probs = top_p_filter(logp.exp(), top_p)
    if generator is None or isinstance(generator, torch.Generator):
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        tokens = torch.cat(
            [torch.multinomial(probs[b], 1, generator=generator[r]) for b, r in enumerate(rows)]
        )
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


@functools.cache
def _cache_kwarg() -> str:
    """The forward argument that takes the KV cache: `cache` since transformers 5 renamed
    `past_key_values` (which it still takes, with a deprecation warning), else `past_key_values`."""
    from transformers.utils import generic

    return "cache" if hasattr(generic, "_rename_kwargs_for_bc") else "past_key_values"


def next_token_logits(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, **kwargs: Any
) -> torch.Tensor:
    """One cached forward step: the fp32 logits (B, V) of the token after each row's last column."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{_cache_kwarg(): cache},
        logits_to_keep=1,
        **kwargs,
    )
    return out.logits[:, -1, :].float()


@torch.inference_mode()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    eos_ids: set[int],
    pad_id: int,
    generator: Generators = None,
) -> Samples:
    """`n` completions of each prompt, decoded together (see the module docstring)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, T): positions ignore the padding
    ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
    n_rows = len(prompts) * n
    out = Samples(
        [i // n for i in range(n_rows)],
        [[] for _ in range(n_rows)],
        [[] for _ in range(n_rows)],
        [False] * n_rows,
    )
    was_training = model.training
    model.eval()
    try:
        cache = DynamicCache()
        # each prompt's forward pass runs once; its n rows share the result (cache and logits repeated)
        logits = next_token_logits(model, ids, mask, pos, cache).cpu().repeat_interleave(n, dim=0)
        if n > 1:
            cache.batch_repeat_interleave(n)
            mask, pos = mask.repeat_interleave(n, dim=0), pos.repeat_interleave(n, dim=0)
        live = list(range(n_rows))  # the row of each batch position still decoding
        last_pos = pos[:, -1]
        for _ in range(max_new_tokens):
            tokens, logps = _choose(logits, temperature, top_p, generator, live)
            keep = []
            for b, r in enumerate(live):
                token = int(tokens[b])
                out.completions[r].append(token)
                out.logprobs[r].append(float(logps[b]))
                if token in eos_ids:
                    out.finished[r] = True
                else:
                    keep.append(b)
            if not keep or len(out.completions[live[keep[0]]]) >= max_new_tokens:
                break
            index = torch.tensor(keep)
            if len(keep) < len(live):  # drop finished rows from the batch and the KV cache
                cache.batch_select_indices(index.to(device))
                mask, last_pos = mask[index.to(device)], last_pos[index.to(device)]
                live = [live[b] for b in keep]
            next_ids = tokens[index].to(device)[:, None]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long, device=device)], dim=1)
            last_pos = last_pos + 1
            logits = next_token_logits(model, next_ids, mask, last_pos[:, None], cache).cpu()
    finally:
        model.train(was_training)
    return out
