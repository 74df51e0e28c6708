"""What `adaptlab plan --task grpo` adds: a task's size in prompts, and the memory and time of sampling.

A GRPO step samples `group_size` completions (train's --group-size, default 8) of up to
`max_new_tokens` (default 32) of each of its prompts (batch x grad_accum prompts) in one batched decode
with a KV cache, then trains on those rows in micro-batches of `batch` completions. The sampling phase
holds the KV cache of every row of the step (estimate.generation_memory_bytes) while no activations are
alive; its time is the prompt's forward pass plus one decode step per new token
(estimate.generation_time_s). The training phase is an ordinary step over rows of prompt +
completion tokens. With a KL penalty (kl_beta > 0) every step also scores its rows with the reference
policy (`reference`): a forward pass without autograd, over the LoRA family's model with its adapter
disabled or, for full fine-tuning, over a frozen copy of the base that stays loaded for the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from adaptlab.config import ObjectiveSpec, field_error
from adaptlab.errors import UserError
from adaptlab.plan.arch import Arch
from adaptlab.plan.datasize import DataSize
from adaptlab.plan.estimate import (
    Arm,
    Shape,
    forward_pass_s,
    generation_memory_bytes,
    generation_time_s,
)

SAMPLE_PROMPTS = 512


@dataclass(frozen=True)
class Sampling:
    """How a step samples: completions per prompt and their longest length (train's defaults)."""

    group_size: int = ObjectiveSpec.model_fields["group_size"].default
    max_new_tokens: int = ObjectiveSpec.model_fields["max_new_tokens"].default


def sampling_from(group_size: int | None, max_new_tokens: int | None) -> Sampling:
    """The sampling `adaptlab plan` was asked for (train's defaults where not given), checked by train's
    own spec (config.ObjectiveSpec)."""
    given = {
        k: v for k, v in (("group_size", group_size), ("max_new_tokens", max_new_tokens)) if v is not None
    }
    try:
        spec = ObjectiveSpec(task="grpo", **given)
    except ValidationError as err:
        where, msg = field_error(err)
        raise UserError(f"--{where.replace('_', '-')}: {msg}") from None
    return Sampling(spec.group_size, spec.max_new_tokens)


def task_data_size(source: str, tokenizer: Any, sampling: Sampling) -> tuple[DataSize, int]:
    """(the task's size, the longest prompt in tokens); prompt lengths from up to SAMPLE_PROMPTS items."""
    from adaptlab.data.tasks import load_task, render_prompt_ids, split_items

    items = load_task(source)
    train = split_items(items, "train")
    step = max(1, len(items) // SAMPLE_PROMPTS)
    lengths = [len(render_prompt_ids(it.prompt, tokenizer)) for it in items[::step]]
    mean = sum(lengths) / len(lengths)
    per_row = round(mean) + sampling.max_new_tokens
    size = DataSize(
        documents=len(items),
        tokens=round(mean * len(items)),
        tokens_ci95=0,
        exact=step == 1,
        sampled_documents=len(lengths),
        characters=sum(len(it.prompt) for it in items),
        kind="task",
        train_documents=len(train),
        tokens_per_epoch=len(train) * sampling.group_size * per_row,
        examples_per_epoch=len(train) * sampling.group_size,
    )
    return size, max(lengths)


def train_shape(shape: Shape, prompt_len: int, sampling: Sampling) -> Shape:
    """The training phase's shape: rows of prompt + completion, every completion of the step's prompts."""
    prompts = shape.batch * shape.grad_accum
    accum = -(-prompts * sampling.group_size // shape.batch)
    seq = min(shape.seq_len, prompt_len + sampling.max_new_tokens)
    return replace(shape, seq_len=seq, grad_accum=accum)


def reference(arm: Arm, timing: dict[str, float]) -> dict[str, object]:
    """What the KL penalty's reference adds to a step, as `adaptlab train --task grpo` computes it: a
    forward pass over the step's rows (2N FLOPs a token against the training step's 4N for the LoRA
    family and 6N for full), before the policy's; full fine-tuning's frozen copy of the base is counted
    in the weights (estimate.memory_breakdown(reference_model=True))."""
    return {
        "reference": "a frozen copy of the base" if arm.method == "full" else "adapter-disabled forward pass",
        "reference_s": forward_pass_s(arm, timing),
    }


def with_sampling(
    mem: dict[str, int], arch: Arch, prompts: int, prompt_len: int, sampling: Sampling, precision: str
) -> int:
    """The peak of a GRPO step: the training phase's (`mem`, estimate.memory_breakdown of train_shape) or
    the sampling phase's, when the KV cache of every row of the step replaces the activations; records
    the sampling phase's own bytes as mem["generation"]."""
    rows = prompts * sampling.group_size
    mem["generation"] = generation_memory_bytes(arch, rows, prompt_len + sampling.max_new_tokens, precision)
    return max(mem["peak"], mem["peak"] - mem["activations"] - mem["logits"] + mem["generation"])


def add_sampling(
    entry: dict[str, Any],
    arch: Arch,
    prompts: int,
    prompt_len: int,
    sampling: Sampling,
    precision: str,
    rate: dict[str, float],
) -> None:
    """Add the sampling phase of a step over `prompts` prompts to one method's estimate (in place): all
    their completions are decoded together, group_size rows a prompt."""
    rows = prompts * sampling.group_size
    mem = entry["memory"]
    mem["peak"] = entry["peak_mem_bytes"] = with_sampling(mem, arch, prompts, prompt_len, sampling, precision)
    gen_s = generation_time_s(
        arch,
        rows,
        prompt_len,
        sampling.max_new_tokens,
        rate.get("forward_flops_per_s", rate["matmul_flops_per_s"]),
        rate["mem_bytes_per_s"],
        precision,
    )
    entry["time_breakdown_s"]["generation_s"] = gen_s
    entry["time_per_epoch_s"] *= (entry["step_s"] + gen_s) / entry["step_s"]
    entry["step_s"] += gen_s
