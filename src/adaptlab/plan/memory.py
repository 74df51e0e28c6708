"""Peak training memory of one arm (`memory_breakdown`), and what GRPO's sampling and reference add.

Memory is what `adaptlab train` holds at its peak (fp32 master weights, bf16 autocast where chosen):
weights, gradients and AdamW states (two fp32 moments) of the trainable parameters, the bf16 weight
copies autocast makes (all of them kept for backward where a Linear saves its casts, one block's at a
time where it saves the fp32 weight: adaptlab.autocast_linear, fused_lora), the activations autograd
saves (counted tensor by tensor for a Llama-style block, see `layer_activation_bytes`), what the
chunked cross-entropy holds (one chunk of logits, never the whole (B, T, vocab): `loss_bytes`), the
data held in Python, and the runtime itself (peak RSS of the imported stack on CPU, the CUDA context
on GPU). The peak is the larger of the forward/backward peak (activations alive), the
optimizer-step peak (gradients alive; with optimizer_in_backward only the one being applied) and
the end of loading. The CPU constants below were fitted against real runs (bench/plan_accuracy.py).
"""

from __future__ import annotations

from adaptlab.plan.arch import ATTN_IN, MLP_IN, Arch
from adaptlab.plan.arms import (
    ADAM_BYTES_PER_PARAM,
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
from adaptlab.transforms import Transforms

# --- calibration (bench/plan_accuracy.py: measured peak RSS on a 2-core EPYC CPU) -------------------
# Heap slack on CPU: glibc keeps freed blocks below its mmap threshold (up to 32 MB: activations, not
# the logits) for reuse, so peak RSS exceeds the live activations. Fitted on smollm2-135m: 1.2-2.3 over
# full, LoRA and QLoRA at 2 x 128 and 4 x 256, varying from run to run for the same config.
CPU_HEAP_SLACK = 1.6
# QLoRA dequantizes every 4-bit weight to the matmul dtype in forward and again in backward; those
# blocks pass through the same heap, which keeps about this fraction of the fp32 weights of the Linears
# whose copy is under glibc's mmap threshold (larger ones are unmapped when freed). Fitted
# on smollm2-135m with the fused QLoRA Linear (bench/results/plan_accuracy_qlora_avx512bf16.json); PEFT's
# QLoRA forward, with its separate adapter passes, left twice as much.
CPU_QLORA_DEQUANT_RESIDUAL = 0.3
# Tokenizer, model objects, Python structures of the run beyond the imported stack.
CPU_RUN_OVERHEAD_BYTES = 0
# Resident memory left by loading the checkpoint (mapped file pages, loading buffers), as a fraction
# of the fp32 weights. Fitted on smollm2-135m (full and LoRA, 2 x 128, fp32): 0.6. A frozen base (the
# LoRA family) keeps less: its weights are the mapped file's pages, which full fine-tuning's optimizer
# copies on first write. Refitted over every smollm2 row of an avx2 and an avx512_bf16 CPU: 0.3.
# Only an fp32 checkpoint leaves them: one stored in bf16 or fp16 is converted into memory the
# weights own, and its map is closed (random-1b, bf16 on disk, LoRA: plan -0.1% without the term).
CPU_LOAD_RESIDUAL = 0.6
CPU_LOAD_RESIDUAL_FROZEN = 0.3
# glibc's largest mmap threshold: a freed block at least this large goes back to the system at once.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# Python bytes per token held in training examples (int object + two list slots).
PY_BYTES_PER_TOKEN = 44


def layer_activation_bytes(
    arch: Arch,
    arm: Arm,
    precision: str,
    fused: bool | None = None,
    norms_fused: bool | None = None,
    linears_fused: bool | None = None,
    lora_fused: bool | None = None,
) -> int:
    """Bytes autograd saves per token in one Llama-style block (counted from the saved tensors).

    Residual stream and RMSNorm math are fp32; under bf16 autocast every Linear casts its fp32 input
    to its own bf16 copy. Saved: each norm's input (and its normalised input when norm weights
    train), the attention kernel's q, k, v and output, the MLP's gate and up outputs, and the input of
    every Linear whose weight (or LoRA A) needs a gradient, plus the LoRA A output (r values). An MLP
    that is not fused (adaptlab.fused) also keeps its SiLU output and its product; `fused` defaults to
    whether training fuses this architecture's MLP. Fused norms (adaptlab.fused_norm) keep neither the
    normalised input nor, in fp32, the output the Linears read; `norms_fused` defaults to whether
    training fuses this architecture's norms. Under bf16 autocast the Linears of full fine-tuning and
    of LoRA (adaptlab.autocast_linear, fused_lora) keep their uncast input, not a bf16 cast each;
    `linears_fused` defaults to whether training does that here (where it fuses norms, and also under
    activation checkpointing). `lora_fused`: whether training takes the fused LoRA Linear (default: unless
    `arm.peft_forward`).
    """
    fused = arch.fused_mlp if fused is None else fused
    norms_fused = arch.fused_norms if norms_fused is None else norms_fused
    linears_fused = arch.fused_norms if linears_fused is None else linears_fused
    uncast = precision != "bf16" or (linears_fused and arm.method in UNCAST_SAVERS)
    b = 2 if precision == "bf16" else 4
    h, q, kv, inter = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    full = arm.method == "full"
    total = 2 * FP32 * h + (2 * FP32 * h if full and not norms_fused else 0)  # two norms
    total += b * (2 * q + 2 * kv)  # sdpa: q, k, v, output (= o_proj input)
    total += (2 if fused else 3) * b * inter  # gate out, up out (and SiLU out unless fused)
    grads = set(arch.short_names()) if full else set(arm.targets)
    inputs = {name: (arch.per_layer(name) or (h, h))[0] for name in grads}
    if fused:
        inputs.pop("down_proj", None)  # the MLP product is rebuilt in backward (adaptlab.fused)
    if not uncast:  # each Linear keeps its own bf16 cast
        for name, n_in in inputs.items():
            if full and name == "o_proj":
                continue  # the attention output is already bf16 and saved
            total += b * n_in
    else:  # Linear inputs alias the norm outputs (one per norm), the attention output, the MLP product
        if not norms_fused:
            total += FP32 * h * (any(n in ATTN_IN for n in inputs) + any(n in MLP_IN for n in inputs))
        if "down_proj" in inputs:
            total += b * inter
    if arm.is_lora:
        total += (
            b
            * arm.rank
            * len([n for n in arch.linear_shapes if n.rsplit(".", 1)[-1] in arm.targets])
            // max(arch.n_layers, 1)
        )
    if arm.method == "dora":  # the magnitude rescaling keeps each target's unscaled output (fused_lora)
        total += b * sum((arch.per_layer(n) or (h, h))[1] for n in arm.targets)
    if arm.is_lora and arm.dropout > 0:
        fused_lora = not arm.peft_forward if lora_fused is None else lora_fused
        total += _dropout_bytes(arch, arm, precision, fused_lora)
    return total


def _dropout_bytes(arch: Arch, arm: Arm, precision: str, fused: bool) -> int:
    """What LoRA dropout keeps per token in one block: the fused LoRA Linear keeps each target's mask as
    bool and rebuilds dropout(x) in backward (adaptlab.fused_lora); PEFT's forward (DoRA with dropout)
    keeps dropout(x) in x's dtype (fp32: the residual stream's norms) and torch's bool mask, and under
    bf16 autocast A's bf16 cast of it."""
    n_in = sum((arch.per_layer(n) or (arch.hidden, arch.hidden))[0] for n in arm.targets)
    if fused:
        return n_in
    return n_in * (FP32 + 1 + (2 if precision == "bf16" else 0))


def loss_bytes(arch: Arch, shape: Shape) -> int:
    """What the chunked cross-entropy (adaptlab.losses) holds at its peak: one chunk's fp32 logits
    (turned into the softmax gradient in place), their matmul-dtype copy under bf16, and the gradient
    of the hidden states it hands to backward (the head's weight gradient is `early_grads`)."""
    from adaptlab.losses import chunk_tokens

    tokens = shape.tokens_per_micro
    chunk = min(tokens, chunk_tokens(arch.vocab))
    per_logit = FP32 + (2 if shape.precision == "bf16" else 0)
    return chunk * arch.vocab * per_logit + FP32 * arch.hidden * tokens


def memory_breakdown(
    arch: Arch,
    arm: Arm,
    shape: Shape,
    runtime_bytes: int,
    data_bytes: int = 0,
    reference_model: bool = False,
    transforms: Transforms | None = None,
) -> dict[str, int]:
    """Peak training memory by component, and the peak itself (bytes). `transforms`: what training
    applies (adaptlab.transforms: fused kernels, frozen Linears held in bf16); default an eager run's."""
    t = transforms or eager(arm, shape)
    n_train = trainable_params(arch, arm)
    held = held_params(arch, arm, shape) if t.hold_base_bf16 else 0
    held_block = held_block_params(arch, arm, shape) if t.hold_base_bf16 else 0
    weights = _weight_bytes(arch, arm, shape, held, reference_model)
    acts = _activations(arch, arm, shape, t)
    activations = acts[
        "activations_checkpointing" if shape.grad_checkpointing else "activations_no_checkpointing"
    ]
    logits = loss_bytes(arch, shape)
    linears_fused = arch.fused_norms and t.fuse_linears
    weight_copies = _weight_copy_bytes(arch, arm, shape, held, held_block, linears_fused)
    layer_linear = arch.linear_params // max(arch.n_layers, 1)
    # in backward, only the gradient being applied is alive (the largest: the tied embedding's)
    largest_grad = FP32 * max(arch.embedding_params, layer_linear) * (not arm.is_lora)
    gradients = largest_grad if shape.optimizer_in_backward else FP32 * n_train
    optimizer = ADAM_BYTES_PER_PARAM * n_train
    # The head's gradient (vocab x hidden) arrives first in backward, while activations are alive.
    early_grads = FP32 * arch.vocab * arch.hidden if arm.method == "full" else 0
    cpu = shape.device_type == "cpu"
    slack = CPU_HEAP_SLACK if cpu else 1.0
    runtime = runtime_bytes + (CPU_RUN_OVERHEAD_BYTES if cpu else 0)
    # QLoRA releases the mapped checkpoint once its Linears are 4-bit (quantize.py)
    residual = CPU_LOAD_RESIDUAL_FROZEN if arm.is_lora else CPU_LOAD_RESIDUAL
    mapped = cpu and arm.method != "qlora" and arch.stored_bytes == FP32  # weights still view the file
    loading = round(residual * FP32 * arch.total_params) if mapped else 0
    data = data_bytes if cpu else 0
    static = runtime + loading + data + weights
    # bf16 weight copies take the same blocks at every step: no slack over them
    dynamic = weight_copies + activations + round((slack - 1) * acts["churn"]) + logits + early_grads
    if cpu and arm.method == "qlora":  # dequantized copies too large for the heap are unmapped at once
        b = shape.act_bytes
        heap_sized = [i * o for i, o in arch.linear_shapes.values() if i * o * b < GLIBC_MMAP_THRESHOLD_MAX]
        dynamic += round(CPU_QLORA_DEQUANT_RESIDUAL * FP32 * sum(heap_sized))
    forward_peak = static + optimizer + dynamic
    step_peak = static + gradients + optimizer + largest_grad
    load_peak = _load_peak(arch, arm, t, cpu, runtime + data, weights, held)
    return {
        "runtime": runtime,
        "loading": loading,
        "data": data,
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "weight_copies": weight_copies,
        "activations": activations,
        "activations_no_checkpointing": acts["activations_no_checkpointing"],
        "activations_checkpointing": acts["activations_checkpointing"],
        "logits": logits,
        "peak": max(forward_peak, step_peak, load_peak),
    }


def _weight_bytes(arch: Arch, arm: Arm, shape: Shape, held: int, reference_model: bool) -> int:
    """The model's weights: fp32 (QLoRA's Linears in NF4), those `held` in bf16 at 2 bytes, and a
    frozen copy of the base where full fine-tuning's reference policy needs one."""
    if arm.method == "qlora":
        weights = round(arch.linear_params * NF4_BYTES_PER_PARAM) + FP32 * (
            arch.total_params - arch.linear_params
        )
    else:
        weights = FP32 * arch.total_params
    weights -= (FP32 - 2) * held
    if reference_model and arm.method == "full":  # a frozen copy of the base scores the reference policy
        weights += reference_copy_bytes(arch, shape.precision)
    return weights


def _activations(arch: Arch, arm: Arm, shape: Shape, t: Transforms) -> dict[str, int]:
    """What autograd saves over a micro-batch, with and without activation checkpointing, and the
    "churn": the blocks a step allocates and frees, over which the CPU heap keeps its slack."""
    tokens = shape.tokens_per_micro
    norms_fused = arch.fused_norms and t.fuse_norms
    linears_fused = arch.fused_norms and t.fuse_linears
    lora_fused = t.fuse_lora and not arm.peft_forward
    per_layer = layer_activation_bytes(
        arch, arm, shape.precision, None, norms_fused, linears_fused, lora_fused
    )
    # final norm: its input; with full fine-tuning also its normalised output and the head's input
    head_in = (FP32 if shape.act_bytes == 4 else 2) * arch.hidden
    edge = (FP32 * arch.hidden + ((FP32 * arch.hidden + head_in) if arm.method == "full" else 0)) * tokens
    acts_full = per_layer * tokens * arch.n_layers + edge
    acts_ckpt = FP32 * arch.hidden * tokens * arch.n_layers + per_layer * tokens + edge
    activations = acts_ckpt if shape.grad_checkpointing else acts_full
    # The heap's slack follows the blocks a step allocates and frees, which fusing the MLP leaves as
    # they were (it still computes the SiLU output and the product; it keeps fewer of them).
    unfused = layer_activation_bytes(arch, arm, shape.precision, False, False, linears_fused, lora_fused)
    unfused_extra = unfused - per_layer
    churn = activations + unfused_extra * tokens * (1 if shape.grad_checkpointing else arch.n_layers)
    return {"activations_no_checkpointing": acts_full, "activations_checkpointing": acts_ckpt, "churn": churn}


def _weight_copy_bytes(
    arch: Arch, arm: Arm, shape: Shape, held: int, held_block: int, linears_fused: bool
) -> int:
    """The bf16 copies autocast makes of the fp32 weights (and QLoRA's dequantized block at fp32)."""
    layer_linear = arch.linear_params // max(arch.n_layers, 1)
    head = arch.vocab * arch.hidden
    copied_head = 0 if held > held_block else head  # a held (untied) head needs no cast in the loss
    if shape.act_bytes != 2:
        return 2 * layer_linear if arm.method == "qlora" else 0
    if (
        arm.method == "qlora" or shape.grad_checkpointing or (arm.method in UNCAST_SAVERS and linears_fused)
    ):  # one block's bf16 weights at a time (none of those held in bf16)
        return 2 * (layer_linear - held_block // max(arch.n_layers, 1) + copied_head)
    # every Linear's bf16 copy, saved for backward; the loss casts the head per call
    return 2 * (arch.linear_params - held_block)


def _load_peak(
    arch: Arch, arm: Arm, t: Transforms, cpu: bool, runtime_and_data: int, weights: int, held: int
) -> int:
    """Memory at the end of loading: QLoRA's checkpoint in its stored dtype (then quantized), the rest in
    fp32, and on a CPU, while a checkpoint stored narrower is converted, its mapped pages too (read whole
    by then). LoRA at bf16 loads a bf16 checkpoint's Linears as stored (frozen_base.load_held): its
    weights, and on a CPU the pages of the tensors widened to fp32."""
    if arch.stored_bf16 and t.load_held:
        return runtime_and_data + weights + (2 * (arch.total_params - held) if cpu else 0)
    converted = cpu and arm.method != "qlora" and arch.stored_bytes != FP32
    return (
        runtime_and_data
        + (arch.stored_bytes if arm.method == "qlora" else FP32) * arch.total_params
        + (weights if arm.method == "qlora" else 0)
        + (arch.stored_bytes * arch.total_params if converted else 0)
    )


def reference_copy_bytes(arch: Arch, precision: str) -> int:
    """GRPO's frozen copy of the base for full fine-tuning's KL term (objectives/grpo.load_reference_copy):
    whole on every device, its Linears held in bf16 at bf16 (frozen_base.py)."""
    held = arch.linear_params + arch.lm_head_params if precision == "bf16" else 0
    return FP32 * arch.total_params - (FP32 - 2) * held


def generation_memory_bytes(arch: Arch, rows: int, context_len: int, precision: str = "fp32") -> int:
    """What GRPO's sampling adds at its peak: the KV cache of `rows` sequences (prompts x group size)
    of context_len tokens (prompt + completion), and one decode step's (rows, vocab) fp32 logits."""
    b = 2 if precision == "bf16" else 4
    kv_cache = 2 * arch.n_layers * arch.kv_dim * b * rows * context_len  # K and V per layer
    return kv_cache + FP32 * arch.vocab * rows * 2  # logits and their softmax
