"""Memory, FLOPs, time and artifact size of one training arm, from the architecture alone.

Memory is what `adaptlab train` holds at its peak (fp32 master weights, bf16 autocast where chosen):
weights, gradients and AdamW states (two fp32 moments) of the trainable parameters, the bf16 weight
copies autocast makes (all of them kept for backward where a Linear saves its casts, one block's at a
time where it saves the fp32 weight: adaptlab.autocast_linear, fused_lora), the activations autograd
saves (counted tensor by tensor for a Llama-style block, see `layer_activation_bytes`), what the
chunked cross-entropy holds (one chunk of logits, never the whole (B, T, vocab): `loss_bytes`), the
data held in Python, and the runtime itself (peak RSS of the imported stack on CPU, the CUDA context
on GPU). The peak is the larger of the forward/backward peak (activations alive) and the
optimizer-step peak (gradients alive; with optimizer_in_backward only the one being applied).

Time is an estimate: training FLOPs (6 N per token for full fine-tuning, 4 N + 6 x adapter for the
LoRA family, whose frozen weights need no weight gradient) over the measured matmul rate of a Linear,
causal attention's FLOPs over the measured rate of the attention kernel, plus elementwise traffic
(activations, logits, autocast's casts, optimizer) over the measured memory bandwidth.
The calibration below was fitted against real runs on a quiet 2-core CPU (bench/plan_accuracy.py,
full, LoRA and QLoRA on tiny-random and smollm2-135m at 2 x 128 and 4 x 256); the time constants have
not been checked on a GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adaptlab.config import RunConfig, build_config, is_lora
from adaptlab.plan.arch import ATTN_IN, MLP_IN, Arch
from adaptlab.transforms import Transforms, decide

# --- calibration (bench/plan_accuracy.py: measured peak RSS / step time on a 2-core EPYC CPU) -------
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

# --- definitions ----------------------------------------------------------------------------------
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8  # 4-bit values + double-quantized blockwise absmax constants
FP32 = 4
ADAM_BYTES_PER_PARAM = 8  # exp_avg + exp_avg_sq in fp32


UNCAST_SAVERS = ("full", "lora", "qlora", "dora")
"""Methods whose trained Linears keep uncast tensors under autocast (adaptlab.autocast_linear, fused_lora)."""


@dataclass(frozen=True)
class Arm:
    """One way to train: the method, LoRA rank and target short names (empty for full)."""

    method: str  # full | lora | dora | qlora
    rank: int = 0
    targets: tuple[str, ...] = ()
    dropout: float = 0.0  # LoRA dropout on the adapters' input

    @property
    def peft_forward(self) -> bool:
        """Whether training runs PEFT's own LoRA forward (DoRA with dropout), not adaptlab.fused_lora."""
        return self.method == "dora" and self.dropout > 0

    @property
    def is_lora(self) -> bool:
        return is_lora(self.method)


@dataclass(frozen=True)
class Shape:
    """The shape of a training step and where it runs."""

    batch: int
    seq_len: int
    grad_accum: int = 1
    precision: str = "bf16"  # fp32 | bf16 (autocast)
    grad_checkpointing: bool = False
    device_type: str = "cpu"
    rows_per_example: int = 1  # 2 for preference pairs (chosen and rejected)
    optimizer_in_backward: bool = False  # each gradient applied and freed in backward (optim_backward.py)

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4

    @property
    def tokens_per_micro(self) -> int:
        return self.batch * self.seq_len * self.rows_per_example


def eager(arm: Arm, shape: Shape, strategy: str | None = None) -> Transforms:
    """What an eager (not compiled) run of `arm` at `shape` gets under `strategy` (transforms.decide): the
    paths the estimates model when no Transforms is given."""
    return decide(
        method=arm.method,
        device_type=shape.device_type,
        precision=shape.precision,
        strategy=strategy,
        compile=False,
        grad_checkpointing=shape.grad_checkpointing,
    )


def run_config(
    model: str, arm: Arm, shape: Shape, task: str | None, compile: bool | str, tokens: int | None
) -> RunConfig:
    """The config `adaptlab train` would run for this arm at `shape` over `tokens` (None: the default
    steps): what adaptlab.transforms reads from it. `task`: the plan's (cpt and ift train as sft)."""
    method: dict[str, Any] = {"method": arm.method}
    if arm.is_lora:
        method.update(rank=arm.rank, targets=list(arm.targets), dropout=arm.dropout)
    train = {
        "precision": shape.precision,
        "compile": compile,
        "grad_checkpointing": shape.grad_checkpointing,
        "optimizer_in_backward": shape.optimizer_in_backward,
        "batch": shape.batch,
        "grad_accum": shape.grad_accum,
        "seq_len": shape.seq_len,
        **({"tokens": max(tokens, 1)} if tokens is not None else {}),
    }
    objective = {"task": "sft" if task in (None, "cpt", "ift") else task}
    return build_config({"model": {"name": model}, "method": method, "train": train, "objective": objective})


def transforms_report(arch: Arch, arm: Arm, shape: Shape, t: Transforms) -> dict[str, Any]:
    """What the plan reports of a method's transforms: each decision, why, and the weights held in bf16."""
    held = held_params(arch, arm, shape) if t.hold_base_bf16 else 0
    decisions = {k: v for k, v in asdict(t).items() if k != "why"}
    return {**decisions, "lora_forward": _lora_forward(arm, t), "held_bf16_params": held, "why": t.why}


def _lora_forward(arm: Arm, t: Transforms) -> str | None:
    """Which LoRA forward training steps take: adaptlab's fused one or PEFT's (None for full)."""
    if not arm.is_lora:
        return None
    return "fused" if t.fuse_lora and not arm.peft_forward else "peft"


def trainable_params(arch: Arch, arm: Arm) -> int:
    if arm.method == "full":
        return arch.total_params
    return arch.lora_params(arm.rank, list(arm.targets), dora=arm.method == "dora")


def held_block_params(arch: Arch, arm: Arm, shape: Shape) -> int:
    """Block Linear weights training holds in bf16 (adaptlab.frozen_base): the frozen ones, under bf16
    autocast, except DoRA's bases. The untied head's are `held_params` minus these."""
    if shape.precision != "bf16" or not arm.is_lora or arm.method == "qlora":
        return 0
    if arm.method == "dora":
        return arch.linear_params - _target_params(arch, arm)
    return arch.linear_params


def held_params(arch: Arch, arm: Arm, shape: Shape) -> int:
    """All weights training holds in bf16: the frozen block Linears and an untied, frozen head."""
    if shape.precision != "bf16" or arm.method == "full":
        return 0
    return held_block_params(arch, arm, shape) + arch.lm_head_params


def _target_params(arch: Arch, arm: Arm) -> int:
    return sum(i * o for p, (i, o) in arch.linear_shapes.items() if p.rsplit(".", 1)[-1] in arm.targets)


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
    tokens = shape.tokens_per_micro
    b = shape.act_bytes
    n_train = trainable_params(arch, arm)
    held = held_params(arch, arm, shape) if t.hold_base_bf16 else 0
    held_block = held_block_params(arch, arm, shape) if t.hold_base_bf16 else 0
    if arm.method == "qlora":
        weights = round(arch.linear_params * NF4_BYTES_PER_PARAM) + FP32 * (
            arch.total_params - arch.linear_params
        )
    else:
        weights = FP32 * arch.total_params
    weights -= (FP32 - 2) * held
    if reference_model and arm.method == "full":  # a frozen copy of the base scores the reference policy
        weights += reference_copy_bytes(arch, shape.precision)
    norms_fused = arch.fused_norms and t.fuse_norms
    linears_fused = arch.fused_norms and t.fuse_linears
    lora_fused = t.fuse_lora and not arm.peft_forward
    per_layer = layer_activation_bytes(
        arch, arm, shape.precision, None, norms_fused, linears_fused, lora_fused
    )
    # final norm: its input; with full fine-tuning also its normalised output and the head's input
    head_in = (FP32 if b == 4 else 2) * arch.hidden
    edge = (FP32 * arch.hidden + ((FP32 * arch.hidden + head_in) if arm.method == "full" else 0)) * tokens
    acts_full = per_layer * tokens * arch.n_layers + edge
    acts_ckpt = FP32 * arch.hidden * tokens * arch.n_layers + per_layer * tokens + edge
    activations = acts_ckpt if shape.grad_checkpointing else acts_full
    # The heap's slack follows the blocks a step allocates and frees, which fusing the MLP leaves as
    # they were (it still computes the SiLU output and the product; it keeps fewer of them).
    unfused = layer_activation_bytes(arch, arm, shape.precision, False, False, linears_fused, lora_fused)
    unfused_extra = unfused - per_layer
    churn = activations + unfused_extra * tokens * (1 if shape.grad_checkpointing else arch.n_layers)
    logits = loss_bytes(arch, shape)
    head = arch.vocab * arch.hidden
    layer_linear = arch.linear_params // max(arch.n_layers, 1)
    copied_head = 0 if held > held_block else head  # a held (untied) head needs no cast in the loss
    if b == 2:
        if (
            arm.method == "qlora"
            or shape.grad_checkpointing
            or (arm.method in UNCAST_SAVERS and linears_fused)
        ):  # one block's bf16 weights at a time (none of those held in bf16)
            weight_copies = 2 * (layer_linear - held_block // max(arch.n_layers, 1) + copied_head)
        else:  # every Linear's bf16 copy, saved for backward; the loss casts the head per call
            weight_copies = 2 * (arch.linear_params - held_block)
    else:
        weight_copies = 2 * layer_linear if arm.method == "qlora" else 0
    # in backward, only the gradient being applied is alive (the largest: the tied embedding's)
    largest_grad = FP32 * max(arch.embedding_params, layer_linear) * (not arm.is_lora)
    gradients = largest_grad if shape.optimizer_in_backward else FP32 * n_train
    optimizer = ADAM_BYTES_PER_PARAM * n_train
    # The head's gradient (vocab x hidden) arrives first in backward, while activations are alive.
    early_grads = FP32 * head if arm.method == "full" else 0
    cpu = shape.device_type == "cpu"
    slack = CPU_HEAP_SLACK if cpu else 1.0
    runtime = runtime_bytes + (CPU_RUN_OVERHEAD_BYTES if cpu else 0)
    # QLoRA releases the mapped checkpoint once its Linears are 4-bit (quantize.py)
    residual = CPU_LOAD_RESIDUAL_FROZEN if arm.is_lora else CPU_LOAD_RESIDUAL
    mapped = cpu and arm.method != "qlora" and arch.stored_bytes == FP32  # weights still view the file
    loading = round(residual * FP32 * arch.total_params) if mapped else 0
    static = runtime + loading + (data_bytes if cpu else 0) + weights
    # bf16 weight copies take the same blocks at every step: no slack over them
    dynamic = weight_copies + activations + round((slack - 1) * churn) + logits + early_grads
    if cpu and arm.method == "qlora":  # dequantized copies too large for the heap are unmapped at once
        heap_sized = [i * o for i, o in arch.linear_shapes.values() if i * o * b < GLIBC_MMAP_THRESHOLD_MAX]
        dynamic += round(CPU_QLORA_DEQUANT_RESIDUAL * FP32 * sum(heap_sized))
    forward_peak = static + optimizer + dynamic
    step_peak = static + gradients + optimizer + largest_grad
    # the end of loading: QLoRA's checkpoint in its stored dtype (then quantized), the rest in fp32, and
    # on a CPU, while a checkpoint stored narrower is converted, its mapped pages too (read whole by
    # then). LoRA at bf16 loads a bf16 checkpoint's Linears as stored (frozen_base.load_held): its
    # weights, and on a CPU the pages of the tensors widened to fp32.
    as_stored = arch.stored_bf16 and t.load_held
    converted = cpu and arm.method != "qlora" and arch.stored_bytes != FP32
    if as_stored:
        load_peak = runtime + (data_bytes if cpu else 0) + weights
        load_peak += 2 * (arch.total_params - held) if cpu else 0
    else:
        load_peak = (
            runtime
            + (data_bytes if cpu else 0)
            + (arch.stored_bytes if arm.method == "qlora" else FP32) * arch.total_params
            + (weights if arm.method == "qlora" else 0)
            + (arch.stored_bytes * arch.total_params if converted else 0)
        )
    return {
        "runtime": runtime,
        "loading": loading,
        "data": data_bytes if cpu else 0,
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "weight_copies": weight_copies,
        "activations": activations,
        "activations_no_checkpointing": acts_full,
        "activations_checkpointing": acts_ckpt,
        "logits": logits,
        "peak": max(forward_peak, step_peak, load_peak),
    }


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


def artifact_bytes(arch: Arch, arm: Arm, tokenizer_bytes: int = 0) -> int:
    """Size on disk of what training writes: the HF model (full) or the PEFT adapter (LoRA family)."""
    if arm.method == "full":
        n_tensors = len(arch.linear_shapes) + 2 * arch.n_layers + 2
        return FP32 * arch.total_params + 100 * n_tensors + tokenizer_bytes + 2_000
    n_train = trainable_params(arch, arm)
    n_modules = len([p for p in arch.linear_shapes if p.rsplit(".", 1)[-1] in arm.targets])
    per_module = 3 if arm.method == "dora" else 2
    # safetensors: fp32 values + a JSON header (~110 bytes per tensor); adapter_config.json; README.md
    return FP32 * n_train + 110 * per_module * n_modules + 1_100 + 5_200


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
