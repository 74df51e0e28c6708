"""Drift: mean per-token KL(base || tuned) between full next-token distributions.

KL is taken at every scored position, from fp32 log_softmax of both models' logits, over
  - general text G (the same documents, windows and scored positions as perplexity.py), or
  - without G, text sampled from the base model: each shipped general prompt (prompts.py),
    rendered through the chat template when the tokenizer has one, continued by `new_tokens`
    tokens drawn from the base's own distribution (temperature 1, no top-k/top-p) with a fixed
    seed in batches of SAMPLE_BATCH; KL is taken on the sampled tokens only.

Figure: kl = sum of per-position KL / positions (nats per token). Per-position values are
clamped at 0 to drop float rounding below zero; identical logits give exactly 0. Windows are packed
several to a row (attention kept inside each) and the logits of both models exist only for a chunk
of scored positions at a time (from their final hidden states, adaptlab.losses). When the tuned
model is a PeftModel and no separate base is given, each batch runs once with the adapters and
once inside `disable_adapter()`: one model in memory, base and tuned logits of the same batch.

    python -c "from adaptlab.evaluate.drift import *; help(drift_scores)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adaptlab.data.corpus import start_token
from adaptlab.data.example import IGNORE_INDEX
from adaptlab.data.tasks import render_prompt_ids
from adaptlab.evaluate.perplexity import Progress, make_windows, model_device, window_batches
from adaptlab.losses import HeadFn, chunk_tokens, hidden_states, model_inputs, output_head

SAMPLE_BATCH = 16  # fixed, so the sampled text does not depend on --batch
NEW_TOKENS = 64


@dataclass
class DriftScores:
    """Per-document (or per-prompt) summed KL in nats and the number of positions."""

    kl: np.ndarray  # (N,)
    tokens: np.ndarray  # (N,)
    kl_reverse: np.ndarray | None = None  # (N,) KL(tuned || base), when asked for


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def as_base(model: Any) -> Iterator[Any]:
    """The model itself with its adapters disabled when it is a PeftModel, else the model unchanged."""
    if is_peft(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def sample_from_base(
    model: Any, tokenizer: Any, prompts: Sequence[str], new_tokens: int = NEW_TOKENS, seed: int = 0
) -> tuple[list[list[int]], list[list[bool]]]:
    """Prompt + sampled continuation per prompt, with a mask that scores only the sampled tokens.

    A continuation stops after the first EOS (kept and scored). `model` may be a PeftModel: the
    base (adapters disabled) is sampled.
    """
    from transformers import GenerationConfig

    device = model_device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    encoded = [render_prompt_ids(p, tokenizer) for p in prompts]
    seqs: list[list[int]] = []
    masks: list[list[bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for lo in range(0, len(encoded), SAMPLE_BATCH):
            chunk = encoded[lo : lo + SAMPLE_BATCH]
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, c in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[r, width - len(c) :] = torch.tensor(c)
                attn[r, width - len(c) :] = 1
            with torch.inference_mode(), as_base(model):
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config
                )
            for r, c in enumerate(chunk):
                gen = out[r, width:].tolist()
                if eos is not None and eos in gen:
                    gen = gen[: gen.index(eos) + 1]
                seq = c + gen
                seqs.append(seq)
                masks.append([t + 1 >= len(c) for t in range(len(seq) - 1)])
    return seqs, masks


def kl_per_position(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """(N, V), (N, V) -> (N,) KL(base || tuned) in fp32, clamped at 0."""
    lp_b = F.log_softmax(base_logits.float(), dim=-1)
    lp_t = F.log_softmax(tuned_logits.float(), dim=-1)
    return (lp_b.exp() * (lp_b - lp_t)).sum(dim=-1).clamp_min(0.0)


def kl_chunked(
    base_hidden: torch.Tensor,
    base_head: HeadFn,
    tuned_hidden: torch.Tensor,
    tuned_head: HeadFn,
    chunk: int,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, H), (N, H) hidden states and their heads -> (N,) KL(base || tuned), and (N,) KL(tuned || base)
    when `reverse`, logits a chunk at a time."""
    out = torch.empty(base_hidden.shape[0], dtype=torch.float32, device=tuned_hidden.device)
    out_rev = torch.empty_like(out) if reverse else None
    for lo in range(0, base_hidden.shape[0], chunk):
        b = base_head(base_hidden[lo : lo + chunk]).to(tuned_hidden.device)
        t = tuned_head(tuned_hidden[lo : lo + chunk])
        out[lo : lo + chunk] = kl_per_position(b, t)
        if out_rev is not None:
            out_rev[lo : lo + chunk] = kl_per_position(t, b)
        del b, t  # this chunk's logits go before the next chunk's exist
    return out, out_rev


def final_hidden(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, HeadFn]:
    """The model's final hidden states (B, T, H) over the batch and its output head (no logits)."""
    with hidden_states(model) as head:
        return model(**model_inputs(batch), use_cache=False).logits, head


def _base_hidden(tuned: Any, base: Any | None, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, HeadFn]:
    """The base's hidden states and head: a separate model, or the PeftModel with adapters disabled
    (its head applied with them disabled too, in case a LoRA sits on lm_head)."""
    if base is not None:
        return final_hidden(base, {k: v.to(model_device(base)) for k, v in t.items()})
    with as_base(tuned):
        hidden, head = final_hidden(tuned, t)

    def head_as_base(h: torch.Tensor) -> torch.Tensor:
        with as_base(tuned):
            return head(h)

    return hidden, head_as_base


def drift_scores(
    tuned: Any,
    tokenizer: Any,
    seqs: Sequence[list[int]],
    masks: Sequence[list[bool] | None],
    base: Any | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    stride: int | None = None,
    progress: Progress | None = None,
    reverse: bool = False,
) -> DriftScores:
    """Summed KL(base || tuned) and positions per sequence; base=None uses the tuned PeftModel's base.

    Windows are packed several to a row; KL is taken at scored positions only, from both models'
    final hidden states a chunk of positions at a time (never full (B, T, V) logits).
    reverse: also sum KL(tuned || base) (DriftScores.kl_reverse) over the same positions.
    """
    if base is None and not is_peft(tuned):
        raise ValueError("drift needs a base model, or a PeftModel whose adapters can be disabled")
    windows = make_windows(seqs, masks, seq_len, stride)
    kl = np.zeros(len(seqs), dtype=np.float64)
    kl_rev = np.zeros(len(seqs), dtype=np.float64) if reverse else None
    tokens = np.zeros(len(seqs), dtype=np.int64)
    device = model_device(tuned)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start_token(tokenizer)
    models = [m for m in (tuned, base) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            for t, spans in window_batches(windows, batch_size, seq_len, pad, device):
                tuned_hidden, tuned_head = final_hidden(tuned, t)  # (B, T, H)
                base_hidden, base_head = _base_hidden(tuned, base, t)
                scored = (t["targets"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)
                per_position = torch.zeros(t["targets"].numel(), dtype=torch.float64, device=device)
                vocab = int(getattr(output_head(tuned), "out_features", 65536))
                values, values_rev = kl_chunked(
                    base_hidden.flatten(0, 1).index_select(0, scored.to(base_hidden.device)),
                    base_head,
                    tuned_hidden.flatten(0, 1).index_select(0, scored),
                    tuned_head,
                    chunk_tokens(vocab),
                    reverse=kl_rev is not None,
                )
                per_position.index_copy_(0, scored, values.double())
                per_position = per_position.view(t["targets"].shape)
                per_position_rev = None
                if values_rev is not None:
                    per_position_rev = torch.zeros_like(per_position).flatten()
                    per_position_rev.index_copy_(0, scored, values_rev.double())
                    per_position_rev = per_position_rev.view(t["targets"].shape)
                for s in spans:
                    w = windows[s.item]
                    kl[w.doc] += float(per_position[s.row, s.start : s.end].sum())
                    if kl_rev is not None and per_position_rev is not None:
                        kl_rev[w.doc] += float(per_position_rev[s.row, s.start : s.end].sum())
                    tokens[w.doc] += w.n_scored
                if progress:
                    progress(int(t["attention_mask"].sum()))
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return DriftScores(kl=kl, tokens=tokens, kl_reverse=kl_rev)
