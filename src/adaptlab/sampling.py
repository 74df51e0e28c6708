"""Batched sampling with a KV cache: many completions per prompt from one model, reproducibly.

`sample()` decodes `n` completions of each of a batch of prompts in one forward pass per token: the
prompts are left-padded so every row's next token sits in the last column, each prompt's forward pass
runs once and its KV cache is repeated for its n rows, the cache grows by one column per step, and
rows that produced an end token leave the batch (and the cache). Randomness
comes only from the `torch.Generator` passed in, so the same generator state, weights and prompts
give the same completions; GRPO seeds it from (seed, step) so a resumed run samples what an
uninterrupted one would. temperature 0 is greedy.

A token is drawn by inverse CDF: one uniform number per row against the cumulative probabilities
(in fp64), where torch.multinomial draws one exponential number per vocabulary entry (49,152 a row
on smollm2, single-threaded on CPUs without MKL's generator: 0.85 s of a 6.5 s smollm2 rollout of
32 rows in a torch.profiler table). Under autocast the weights stay cast for the whole rollout: autocast keeps the casts of
trained weights while no_grad (not inference_mode) is on, and a frozen fp32 output head (smollm2's,
tied to its embeddings, under LoRA) is cast once for the rollout instead of at every token (0.6 s of
the same rollout). Both are the values autocast would cast to, so the logits are unchanged.

It returns, per completion, the log-probability of each chosen token under logits / temperature
(the distribution it was drawn from, before top-p), which GRPO uses as the sampling-time
log-probs of its importance ratio. serve/generation.py shares `left_pad`, `top_p_filter`, `draw` and
`next_token_logits`.

    python -c "import torch; from adaptlab.models import load_model; from adaptlab.sampling import sample; \\
m = load_model('tiny-random'); print(sample(m.model, [[1, 2, 3]], n=2, max_new_tokens=4, \\
temperature=1.0, eos_ids={2}, pad_id=2, generator=torch.Generator().manual_seed(0)).completions)"
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
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
    tokens = draw(top_p_filter(logp.exp(), top_p), generator, rows)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def draw(probs: torch.Tensor, generator: Generators, rows: Sequence[int]) -> torch.Tensor:
    """One index per row of probs (B, V), drawn with probability proportional to its entry: inverse CDF,
    one fp64 uniform per row (from generator[rows[b]] for row b when there is one generator a row)."""
    cdf = probs.double().cumsum(-1)
    if generator is None or isinstance(generator, torch.Generator):
        u = torch.rand((probs.size(0), 1), dtype=torch.float64, generator=generator)
    else:
        u = torch.cat([torch.rand((1, 1), dtype=torch.float64, generator=generator[r]) for r in rows])
    # the first entry whose cumulative sum exceeds u * total: never one with probability 0
    index = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True)[:, 0]
    return index.clamp_(max=probs.size(-1) - 1)


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


@torch.no_grad()  # not inference_mode, under which autocast re-casts every trained weight each token
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
    restore_head = _cast_head_once(model)
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
        restore_head()
        model.train(was_training)
    return out


def _cast_head_once(model: Any) -> Callable[[], None]:
    """Under autocast, give a frozen fp32 output head (a plain Linear, often tied to the embeddings)
    its autocast cast for the rollout, so it is cast once and not at every token (autocast keeps the
    casts of trained weights only); the function returned puts the original weight back."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return lambda: None
    weight = head.weight
    kind = weight.device.type
    if not torch.is_autocast_enabled(kind) or weight.requires_grad or weight.dtype != torch.float32:
        return lambda: None
    if type(weight.data) is not torch.Tensor:  # a sharded DTensor: its owner gathers it, not this
        return lambda: None
    head.weight = torch.nn.Parameter(weight.detach().to(torch.get_autocast_dtype(kind)), requires_grad=False)

    def restore() -> None:
        head.weight = weight  # the tied parameter itself again

    return restore
