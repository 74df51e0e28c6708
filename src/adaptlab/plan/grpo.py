"""What `adaptlab plan --task grpo` adds: a task's size in prompts, and the memory and time of sampling.

A GRPO step samples GROUP_SIZE completions of each of its prompts (batch x grad_accum prompts) with a
KV cache, then trains on those rows in micro-batches of `batch` completions. The sampling phase holds
the KV cache of every row of the step (estimate.generation_memory_bytes) while no activations are
alive; its time is the prompt's forward pass plus one decode step per new token
(estimate.generation_time_s). The training phase is an ordinary step over rows of prompt +
completion tokens. With a KL penalty (kl_beta > 0) every step also scores its rows with the reference
policy (`reference`): a forward pass without autograd, over the LoRA family's model with its adapter
disabled or, for full fine-tuning, over a frozen copy of the base that stays loaded for the whole run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adaptlab.plan.arch import Arch
from adaptlab.plan.datasize import DataSize
from adaptlab.plan.estimate import (
    Arm,
    Shape,
    forward_pass_s,
    generation_memory_bytes,
    generation_time_s,
)

GROUP_SIZE = 8
MAX_NEW_TOKENS = 32
SAMPLE_PROMPTS = 512


def task_data_size(source: str, tokenizer: Any) -> tuple[DataSize, int]:
    """(the task's size, the longest prompt in tokens); prompt lengths from up to SAMPLE_PROMPTS items."""
    from adaptlab.data.tasks import load_task, render_prompt_ids, split_items

    items = load_task(source)
    train = split_items(items, "train")
    step = max(1, len(items) // SAMPLE_PROMPTS)
    lengths = [len(render_prompt_ids(it.prompt, tokenizer)) for it in items[::step]]
    mean = sum(lengths) / len(lengths)
    per_row = round(mean) + MAX_NEW_TOKENS
    size = DataSize(
        documents=len(items),
        tokens=round(mean * len(items)),
        tokens_ci95=0,
        exact=step == 1,
        sampled_documents=len(lengths),
        characters=sum(len(it.prompt) for it in items),
        kind="task",
        train_documents=len(train),
        tokens_per_epoch=len(train) * GROUP_SIZE * per_row,
        examples_per_epoch=len(train) * GROUP_SIZE,
    )
    return size, max(lengths)


def train_shape(shape: Shape, prompt_len: int) -> Shape:
    """The training phase's shape: rows of prompt + completion, every completion of the step's prompts."""
    prompts = shape.batch * shape.grad_accum
    accum = -(-prompts * GROUP_SIZE // shape.batch)
    seq = min(shape.seq_len, prompt_len + MAX_NEW_TOKENS)
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


def add_sampling(
    entry: dict[str, Any], arch: Arch, shape: Shape, prompt_len: int, rate: dict[str, float]
) -> None:
    """Add the sampling phase's memory and time to one method's estimate (in place)."""
    rows = shape.batch * shape.grad_accum * GROUP_SIZE
    gen_mem = generation_memory_bytes(arch, rows, prompt_len + MAX_NEW_TOKENS, shape.precision)
    mem = entry["memory"]
    mem["generation"] = gen_mem
    sampling_peak = mem["peak"] - mem["activations"] - mem["logits"] + gen_mem
    mem["peak"] = entry["peak_mem_bytes"] = max(mem["peak"], sampling_peak)
    gen_s = generation_time_s(
        arch,
        rows,
        prompt_len,
        MAX_NEW_TOKENS,
        rate.get("forward_flops_per_s", rate["matmul_flops_per_s"]),
        rate["mem_bytes_per_s"],
        shape.precision,
    )
    entry["time_breakdown_s"]["generation_s"] = gen_s
    entry["time_per_epoch_s"] *= (entry["step_s"] + gen_s) / entry["step_s"]
    entry["step_s"] += gen_s
