"""Seconds per training step of one arm (`step_time_s`), and of GRPO's sampling and a reference pass.

Time is an estimate: training FLOPs (6 N per token for full fine-tuning, 4 N + 6 x adapter for the
LoRA family, whose frozen weights need no weight gradient) over the measured matmul rate of a Linear,
causal attention's FLOPs over the measured rate of the attention kernel, plus elementwise traffic
(activations, logits, autocast's casts, optimizer) over the measured memory bandwidth.
The calibration below was fitted against real runs on a quiet 2-core CPU (bench/plan_accuracy.py,
full, LoRA and QLoRA on tiny-random and smollm2-135m at 2 x 128 and 4 x 256); the time constants have
not been checked on a GPU.
"""

from __future__ import annotations

from typing import Any

from adaptlab.plan.arch import Arch
from adaptlab.plan.arms import (
    FP32,
    NF4_BYTES_PER_PARAM,
    UNCAST_SAVERS,
    Arm,
    Shape,
    eager,
    held_block_params,
    held_params,
    trainable_params,
)
from adaptlab.plan.memory import layer_activation_bytes
from adaptlab.transforms import Transforms

# --- calibration (bench/plan_accuracy.py: measured step time on a 2-core EPYC CPU) ------------------
# Fraction of the micro-benchmark's matmul rate (an nn.Linear's, measure.device_throughput) a real
# training step achieves. Fitted on smollm2-135m, full, LoRA and QLoRA at 2 x 128 and 4 x 256, fp32:
# the step's matmuls run at the micro-benchmark's rate.
MATMUL_EFFICIENCY = 1.0
# Fixed seconds per micro-batch beyond FLOPs and traffic (Python dispatch, loss, logging): what is left
# of tiny-random's 2 x 128 steps, where matmuls are negligible.
MICRO_BATCH_OVERHEAD_S = 0.05
# Elementwise passes over the saved activations (write, read back, gradient) and over fp32 logits.
ACTIVATION_PASSES = 3.0
LOGIT_PASSES = 8.0
# A LoRA adapter's elementwise work per token, in passes over its module's output and input widths.
# Rank-16 matmuls are bound by these reads and writes, not by FLOPs. PEFT's forward (DoRA,
# dropout): B's output written, scaled and added to the base output (6 over d_out), x read
# by A (1 over d_in); backward: the gradient scaled and read for B's weight gradient (3 over d_out),
# A's input gradient written and added to the base's, x read again for A's weight gradient (5 over
# d_in). About 2 s of a smollm2-135m step at 4 x 256 on the 2-core CPU.
LORA_OUT_PASSES = 9.0
LORA_IN_PASSES = 6.0
# adaptlab.fused_lora (LoRA over a plain or 4-bit Linear): forward accumulates into the base output in place
# (2 over d_out) after A reads x (1 over d_in); backward reads the gradient for B's two matmuls (2 over
# d_out), accumulates A's input gradient into the base's (2 over d_in), reads x for A's weight gradient
# (1 over d_in). Measured 1.12x the PEFT forward's step speed on smollm2-135m, 4 x 256, same process.
FUSED_LORA_OUT_PASSES = 4.0
FUSED_LORA_IN_PASSES = 4.0
# LoRA dropout, bytes moved per mask element (token x input feature of a target), in fp32 as PEFT casts
# A's input: the fused LoRA Linear writes the noise and its bool mask, scales it and multiplies x by it
# (then casts for the matmul); backward rebuilds the multiplier and dropout(x) from the mask and scales A's
# input gradient by it: about 96 bytes. PEFT's forward (DoRA with dropout): the noise, its scaling, the
# product and the gradient's product, about 36. The random draws themselves are timed apart (a CPU draws
# them far slower than it moves bytes).
FUSED_LORA_DROPOUT_BYTES = 96
PEFT_DROPOUT_BYTES = 36
NOMINAL_DROPOUT_DRAWS_PER_S = 1.5e8


def flops_per_token(arch: Arch, arm: Arm, seq_len: int, grad_checkpointing: bool = False) -> float:
    """Training FLOPs per token: 6N (full) or 4N + 6 x adapter (LoRA family), plus causal attention."""
    return linear_flops_per_token(arch, arm, grad_checkpointing) + attention_flops_per_token(
        arch, seq_len, grad_checkpointing
    )


def linear_flops_per_token(arch: Arch, arm: Arm, grad_checkpointing: bool = False) -> float:
    """The Linears' (and head's) training FLOPs per token: 6N (full) or 4N + 6 x adapter (LoRA family)."""
    n = arch.matmul_params
    f = 6.0 * n if arm.method == "full" else 4.0 * n + 6.0 * trainable_params(arch, arm)
    return f + (2.0 * n if grad_checkpointing else 0.0)


def attention_flops_per_token(arch: Arch, seq_len: int, grad_checkpointing: bool = False) -> float:
    """Causal attention's training FLOPs per token: QK^T and AV, forward and twice that backward."""
    attn_fwd = 2.0 * seq_len * arch.q_dim * arch.n_layers  # causal half: 2 * 2 * T * d / 2
    return (4.0 if grad_checkpointing else 3.0) * attn_fwd


def matmul_rate(rate: dict[str, Any], arm: Arm) -> float:
    """The measured matmul FLOP/s that fits the arm's step: a trained Linear's (full fine-tuning) or a
    frozen one's, forward and input gradient only (the LoRA family; their adapters are a few percent)."""
    if arm.method != "full" and "frozen_matmul_flops_per_s" in rate:
        return float(rate["frozen_matmul_flops_per_s"])
    return float(rate["matmul_flops_per_s"])


def step_time_s(
    arch: Arch,
    arm: Arm,
    shape: Shape,
    matmul_flops_per_s: float,
    mem_bytes_per_s: float,
    attention_flops_per_s: float | None = None,
    dropout_draws_per_s: float | None = None,
    transforms: Transforms | None = None,
) -> dict[str, float]:
    """Seconds per optimizer step, split into the Linears' matmuls, attention, elementwise and optimizer
    time (and LoRA dropout's random draws). Attention takes its own measured rate when given
    (`measure.attention_throughput`: a CPU's fused attention kernel runs far below its matmuls in bf16),
    else the Linears'; the draws theirs (`measure.dropout_throughput`), else NOMINAL_DROPOUT_DRAWS_PER_S.
    `transforms`: what training applies (adaptlab.transforms); default an eager run's."""
    t = transforms or eager(arm, shape)
    tokens = shape.tokens_per_micro * shape.grad_accum
    linear = (
        linear_flops_per_token(arch, arm, shape.grad_checkpointing)
        * tokens
        / (MATMUL_EFFICIENCY * matmul_flops_per_s)
    )
    attention = (
        attention_flops_per_token(arch, shape.seq_len, shape.grad_checkpointing)
        * tokens
        / (attention_flops_per_s or MATMUL_EFFICIENCY * matmul_flops_per_s)
    )
    # passes over the activations: rebuilt norm outputs and recast inputs are written and read like saved ones
    per_layer = layer_activation_bytes(
        arch,
        arm,
        shape.precision,
        norms_fused=False,
        linears_fused=False,
        lora_fused=t.fuse_lora and not arm.peft_forward,
    )
    act_bytes = per_layer * arch.n_layers * tokens
    logit_bytes = FP32 * arch.vocab * tokens
    traffic = ACTIVATION_PASSES * act_bytes + LOGIT_PASSES * logit_bytes
    traffic = _add_weight_traffic(traffic, arch, arm, shape, t)
    traffic, draws = _add_adapter_traffic(traffic, arch, arm, shape, t, tokens, dropout_draws_per_s)
    elementwise = traffic / mem_bytes_per_s
    # AdamW + clipping: read param, grad, two moments; write param and moments
    optimizer = 28.0 * trainable_params(arch, arm) / mem_bytes_per_s
    overhead = MICRO_BATCH_OVERHEAD_S * shape.grad_accum
    return {
        "matmul_s": linear,
        "attention_s": attention,
        "elementwise_s": elementwise,
        "optimizer_s": optimizer,
        "overhead_s": overhead,
        **({"dropout_draws_s": draws} if draws else {}),
        "step_s": linear + attention + elementwise + optimizer + overhead + draws,
    }


def _add_weight_traffic(traffic: float, arch: Arch, arm: Arm, shape: Shape, t: Transforms) -> float:
    """`traffic` plus a step's passes over the weights: autocast's bf16 casts, QLoRA's dequantizing."""
    if shape.act_bytes == 2 and arm.method != "qlora":
        # autocast casts each fp32 weight (and the head, in the loss) to bf16 in every forward: read 4
        # bytes, write 2; full fine-tuning's bf16 weight gradients come back to fp32 the same way.
        # Frozen weights held in bf16 (frozen_base.py) are not cast at all.
        held, held_block = held_params(arch, arm, shape), held_block_params(arch, arm, shape)
        if not t.hold_base_bf16:
            held = held_block = 0
        traffic += shape.grad_accum * 6 * (arch.matmul_params - held) * (2 if arm.method == "full" else 1)
        if (
            arm.method in UNCAST_SAVERS and arch.fused_norms and t.fuse_linears
        ):  # each block weight cast again in backward
            traffic += shape.grad_accum * 6 * (arch.linear_params - held_block)
    if arm.method == "qlora":  # dequantize every 4-bit weight to the matmul dtype, forward and backward
        traffic += 2 * shape.grad_accum * arch.linear_params * (NF4_BYTES_PER_PARAM + shape.act_bytes)
    return traffic


def _add_adapter_traffic(
    traffic: float,
    arch: Arch,
    arm: Arm,
    shape: Shape,
    t: Transforms,
    tokens: int,
    dropout_draws_per_s: float | None,
) -> tuple[float, float]:
    """`traffic` plus the LoRA family's elementwise work (adapter passes, dropout masks, DoRA's norms),
    and the seconds LoRA dropout spends drawing its masks."""
    draws = 0.0
    if arm.is_lora:
        widths = [(i, o) for p, (i, o) in arch.linear_shapes.items() if p.rsplit(".", 1)[-1] in arm.targets]
        fused = t.fuse_lora and not arm.peft_forward  # adaptlab.fused_lora
        out_passes = FUSED_LORA_OUT_PASSES if fused else LORA_OUT_PASSES
        in_passes = FUSED_LORA_IN_PASSES if fused else LORA_IN_PASSES
        per_token = sum(out_passes * o + in_passes * i for i, o in widths)
        traffic += shape.act_bytes * tokens * per_token
        if arm.dropout > 0:  # one mask element per token and input feature of every target
            elements = tokens * sum(i for i, _ in widths)
            traffic += elements * (FUSED_LORA_DROPOUT_BYTES if fused else PEFT_DROPOUT_BYTES)
            draws = elements / (dropout_draws_per_s or NOMINAL_DROPOUT_DRAWS_PER_S)
    if arm.method == "dora":  # W + BA and its column norms, per target and micro-batch
        traffic += (
            shape.grad_accum
            * 3
            * FP32
            * sum(i * o for p, (i, o) in arch.linear_shapes.items() if p.rsplit(".", 1)[-1] in arm.targets)
        )
    return traffic, draws


def step_time_at(
    arch: Arch, arm: Arm, shape: Shape, rate: dict[str, Any], transforms: Transforms | None = None
) -> dict[str, float]:
    """`step_time_s` at the rates of a device measurement (measure.device_throughput and the others)."""
    return step_time_s(
        arch,
        arm,
        shape,
        matmul_rate(rate, arm),
        rate["mem_bytes_per_s"],
        rate.get("attention_flops_per_s"),
        rate.get("dropout_draws_per_s"),
        transforms,
    )


def generation_time_s(
    arch: Arch,
    rows: int,
    prompt_len: int,
    new_tokens: int,
    forward_flops_per_s: float,
    mem_bytes_per_s: float,
    precision: str = "fp32",
) -> float:
    """Seconds to sample `new_tokens` for `rows` sequences with a KV cache: the prompt's forward pass,
    then one step per token, each 2N FLOPs per row or one read of the weights, whichever is slower
    (small batches are bound by reading the weights)."""
    n = arch.matmul_params
    prefill = 2.0 * n * rows * prompt_len / (MATMUL_EFFICIENCY * forward_flops_per_s)
    weight_bytes = (2 if precision == "bf16" else FP32) * n
    per_token = max(
        2.0 * n * rows / (MATMUL_EFFICIENCY * forward_flops_per_s), weight_bytes / mem_bytes_per_s
    )
    return prefill + new_tokens * (per_token + MICRO_BATCH_OVERHEAD_S)


def dpo_reference(arm: Arm, timing: dict[str, float]) -> dict[str, object]:
    """What DPO's reference adds to a step, as `adaptlab train --task dpo` computes it.

    The LoRA family scores each micro-batch again with the adapter disabled (a forward pass, 2N FLOPs
    per token against the step's 4N); full fine-tuning scores every training pair once before the
    first step with the untouched model (the same forward FLOPs, paid up front) and keeps 8 bytes per
    pair. Either way the reference pass runs without autograd before the policy's forward, so it adds
    no second copy of the weights and no memory at the step's peak.
    """
    full = arm.method == "full"
    return {
        "reference": "precomputed log-probs of the untouched model"
        if full
        else "adapter-disabled forward pass",
        "reference_s": forward_pass_s(arm, timing),
        "reference_bytes": 0,
    }


def forward_pass_s(arm: Arm, timing: dict[str, float]) -> float:
    """A forward pass without autograd over a training step's tokens: 2N matmul FLOPs a token against the
    step's 6N (full) or 4N (LoRA family: no weight gradients), and a third of its attention."""
    return timing["matmul_s"] * 2 / (6 if arm.method == "full" else 4) + timing.get("attention_s", 0.0) / 3
