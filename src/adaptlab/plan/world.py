"""Per-device memory of one run on N GPUs under DDP and FSDP2, and which strategy fits.

The global batch (batch x grad-accum) is split over the ranks, so each device runs micro-batches of
min(batch, global / N) sequences. DDP keeps everything a single device keeps (full weights, gradients,
AdamW states) plus its gradient buckets (a second copy of the trainable gradients). FSDP2 keeps 1/N
of the weights, gradients and optimizer states, plus the unsharded parameters of the units it has
gathered: the root (embeddings, head, final norm) and up to two decoder blocks (the one computing and
the one prefetched). Activations and logits are per device in both. QLoRA is DDP only (its 4-bit base
cannot be sharded). Like the rest of plan/, these are estimates from the architecture; the GPU
constants have not been checked against runs.

GRPO (task grpo, with the task's longest prompt): the step's prompts are split over the ranks, each
rank samples its prompts' groups in one batch with a KV cache and trains on them in micro-batches of
`batch` rows of prompt + completion. A device's peak is the larger of its training step's and its
sampling phase's (no activations then, the KV cache of its rows instead); with a KL term, full
fine-tuning adds its frozen copy of the base, whole on every device (it is not sharded).

    python -c "from adaptlab.plan.world import plan_world; import json; \
print(json.dumps(plan_world('tiny-random', 4, 80 * 2**30)['recommendation'], indent=1))"
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from adaptlab.errors import UserError
from adaptlab.plan import grpo as grpo_plan
from adaptlab.plan.arch import Arch, load_arch, targets_for
from adaptlab.plan.estimate import (
    FP32,
    Arm,
    Shape,
    eager,
    generation_memory_bytes,
    memory_breakdown,
    reference_copy_bytes,
    run_config,
    trainable_params,
    transforms_report,
)
from adaptlab.plan.measure import CUDA_CONTEXT_BYTES, runtime_baseline_bytes
from adaptlab.transforms import Transforms, transforms_for

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class GrpoSteps:
    """What a GRPO step samples: the task's longest prompt in tokens, the sampling, the KL weight."""

    prompt_len: int
    sampling: grpo_plan.Sampling = grpo_plan.Sampling()
    kl_beta: float = 0.0


PREFETCHED_BLOCKS = 2  # FSDP2 holds the block computing and the next one it prefetches


def device_micro_batch(batch: int, grad_accum: int, world_size: int) -> int:
    """Sequences per micro-batch on one device when the global batch is split over world_size ranks."""
    global_batch = batch * grad_accum
    if global_batch % world_size:
        raise UserError(
            f"--gpus {world_size} does not divide the global batch {global_batch} (batch x grad-accum): "
            f"choose a batch x grad-accum that is a multiple of {world_size}"
        )
    return min(batch, global_batch // world_size)


def _param_bytes(shape: Shape) -> int:
    """Bytes per gathered parameter: bf16 under FSDP2's mixed-precision policy on GPUs, else fp32."""
    return 2 if shape.precision == "bf16" and shape.device_type == "cuda" else FP32


def ddp_bytes(
    arch: Arch, arm: Arm, shape: Shape, runtime: int, transforms: Transforms | None = None
) -> dict[str, int]:
    """One device's memory under DDP: a single device's plus the gradient buckets. `transforms`: what
    training applies (adaptlab.transforms; default an eager run's)."""
    mem = memory_breakdown(arch, arm, shape, runtime, transforms=transforms or eager(arm, shape, "ddp"))
    buckets = FP32 * trainable_params(arch, arm)
    return {**mem, "buckets": buckets, "peak": mem["peak"] + buckets}


def fsdp_bytes(
    arch: Arch,
    arm: Arm,
    shape: Shape,
    runtime: int,
    world_size: int,
    transforms: Transforms | None = None,
) -> dict[str, int]:
    """One device's memory under FSDP2: sharded weights, gradients and optimizer, gathered units.
    Training under FSDP2 fuses no norms or Linears and holds no frozen weight in bf16 (adaptlab.transforms;
    `transforms` defaults to an eager run's)."""
    t = transforms or eager(arm, shape, "fsdp")
    mem = memory_breakdown(arch, arm, shape, runtime, transforms=t)
    n = world_size
    block = (arch.total_params - arch.embedding_params * (1 if arch.tied else 2)) // max(arch.n_layers, 1)
    root = arch.embedding_params * (1 if arch.tied else 2)
    gathered = _param_bytes(shape) * (root + PREFETCHED_BLOCKS * block)
    sharded = {k: -(-mem[k] // n) for k in ("weights", "gradients", "optimizer")}
    per_device_dynamic = mem["weight_copies"] + mem["activations"] + mem["logits"]
    peak = mem["runtime"] + sum(sharded.values()) + gathered + per_device_dynamic
    return {**mem, **sharded, "gathered": gathered, "peak": peak}


def add_grpo(mem: dict[str, int], arch: Arch, arm: Arm, shape: Shape, rows: int, grpo: GrpoSteps) -> None:
    """Add GRPO's sampling phase over `rows` (this device's completions) and the KL reference to one
    device's memory (in place)."""
    context = grpo.prompt_len + grpo.sampling.max_new_tokens
    generation = generation_memory_bytes(arch, rows, context, shape.precision)
    sampling_peak = mem["peak"] - mem["activations"] - mem["logits"] + generation
    reference = (
        reference_copy_bytes(arch, shape.precision) if grpo.kl_beta > 0 and arm.method == "full" else 0
    )
    mem.update(generation=generation, reference=reference, peak=max(mem["peak"], sampling_peak) + reference)


def _arms(arch: Arch, rank: int, targets: str | list[str], dropout: float = 0.0) -> dict[str, Arm]:
    names = tuple(targets_for(arch, targets))
    return {
        "full": Arm("full"),
        "lora": Arm("lora", rank, names, dropout),
        "dora": Arm("dora", rank, names, dropout),
        "qlora": Arm("qlora", rank, names, dropout),
    }


def choose(fits: dict[str, bool | None]) -> str | None:
    """DDP when it fits (no gathers: fastest), else FSDP when it fits, else None."""
    for strategy in STRATEGIES:
        if fits.get(strategy):
            return strategy
    return None


def _per_device(
    arch: Arch, arm: Arm, shape: Shape, strategy: str, t: Transforms, runtime: int, world_size: int
) -> dict[str, Any]:
    """One device's memory under `strategy` with the transforms `t` training applies there, and those."""
    mem = (
        ddp_bytes(arch, arm, shape, runtime, t)
        if strategy == "ddp"
        else fsdp_bytes(arch, arm, shape, runtime, world_size, t)
    )
    return {"memory": mem, "transforms": transforms_report(arch, arm, shape, t)}


def plan_world(
    model: str,
    gpus: int,
    memory_per_device: int,
    parallel: str | None = None,
    batch: int = 4,
    grad_accum: int = 1,
    seq_len: int = 256,
    rank: int = 16,
    targets: str | list[str] = "all-linear",
    precision: str = "bf16",
    grad_checkpointing: bool = False,
    task: str | None = None,
    dropout: float = 0.0,
    grpo: GrpoSteps | None = None,
    compile: bool | str = "auto",
    device: str = "cuda",
) -> dict[str, Any]:
    """Per-device peak memory of every method at `gpus` devices, whether it fits, and the strategy to use.

    task dpo: a preference pair is two rows; grpo: `grpo` says what a step samples (see the module
    docstring); without it the figures are a training step's of `batch` rows of `seq_len` tokens.
    compile: `train --compile`; each strategy's entry says what training applies under it (transforms).
    device: cuda, or cpu (processes on one machine's CPU, gloo)."""
    if gpus < 1:
        raise UserError(f"--gpus must be at least 1 (got {gpus})")
    if parallel is not None and parallel not in STRATEGIES:
        raise UserError(f"--parallel {parallel!r}: choose ddp or fsdp")
    arch = load_arch(model)
    micro = device_micro_batch(batch, grad_accum, gpus)
    shape = Shape(
        micro, seq_len, 1, precision, grad_checkpointing, device, rows_per_example=2 if task == "dpo" else 1
    )
    run_shape = replace(shape, batch=batch, grad_accum=grad_accum, rows_per_example=1)  # the run's config
    runtime = CUDA_CONTEXT_BYTES if device == "cuda" else runtime_baseline_bytes()
    grpo = grpo if task == "grpo" else None
    if grpo is not None:  # micro-batches of `batch` rows of prompt + completion; the rank's prompts' groups
        shape = grpo_plan.train_shape(replace(shape, batch=batch), grpo.prompt_len, grpo.sampling)
        shape = replace(shape, grad_accum=1)
        rows = batch * grad_accum // gpus * grpo.sampling.group_size
    wanted = [parallel] if parallel else list(STRATEGIES)
    methods: dict[str, Any] = {}
    for key, arm in _arms(arch, rank, targets, dropout).items():
        entry: dict[str, Any] = {"method": arm.method, "rank": arm.rank or None}
        fits: dict[str, bool | None] = {}
        for strategy in wanted:
            if strategy == "fsdp" and arm.method == "qlora":
                entry["fsdp"] = None  # bitsandbytes' 4-bit base cannot be sharded
                fits["fsdp"] = None
                continue
            config = run_config(model, arm, run_shape, task, compile, None)
            t = transforms_for(config, torch.device(device), precision, strategy, arch.total_params)
            device_entry = _per_device(arch, arm, shape, strategy, t, runtime, gpus)
            mem = device_entry["memory"]
            if grpo is not None:
                add_grpo(mem, arch, arm, shape, rows, grpo)
            fits[strategy] = mem["peak"] <= memory_per_device
            entry[strategy] = {"peak_mem_bytes": mem["peak"], "fits": fits[strategy], **device_entry}
        entry["strategy"] = choose(fits)
        methods[key] = entry
    return {
        "gpus": gpus,
        "memory_per_device_bytes": memory_per_device,
        "device_micro_batch": shape.batch,  # grpo: `batch` completions, whatever the world size
        "strategies": wanted,
        "methods": methods,
        "recommendation": {k: v["strategy"] for k, v in methods.items()},
        "notes": [
            "per-device estimates for GPUs (bf16 autocast, CUDA context); not yet checked against multi-GPU runs",
            "auto (`adaptlab train --parallel auto`) uses DDP when it fits one device, FSDP2 otherwise",
            *(
                [
                    "grpo: a training step's memory only; sampling's KV cache and the KL reference are not in it"
                ]
                if task == "grpo" and grpo is None
                else []
            ),
        ],
    }


def grpo_steps_from(single: dict[str, Any]) -> GrpoSteps | None:
    """What a GRPO step samples, from the single-device plan of the same run (None for other tasks)."""
    if single.get("task") != "grpo":
        return None
    setup = single["setup"]
    s = setup["sampling"]
    return GrpoSteps(
        s["prompt_len"], grpo_plan.Sampling(s["group_size"], s["max_new_tokens"]), setup["kl_beta"]
    )


def fits_one_device(
    model: str, method: str, batch: int, seq_len: int, precision: str, memory: int, rank: int = 16
) -> bool:
    """Whether DDP (a whole replica per device) fits `memory`: what `--parallel auto` asks."""
    arch = load_arch(model)
    arm = _arms(arch, rank, "all-linear")[method]
    shape = Shape(batch, seq_len, 1, precision, False, "cuda")
    return ddp_bytes(arch, arm, shape, CUDA_CONTEXT_BYTES)["peak"] <= memory


def world_args_from(
    gpus: int | None, parallel: str | None, memory: int | None, flags: dict[str, Any], ranks: list[int]
) -> dict[str, Any]:
    """plan_world's arguments from `adaptlab plan` flags; the memory per GPU is --memory or this GPU's."""
    if gpus is None:
        raise UserError("--parallel needs --gpus N (the number of GPUs to plan for)")
    if memory is None:
        import torch

        if not torch.cuda.is_available():
            raise UserError(
                "--gpus: this machine has no GPU to measure; give each GPU's memory with --memory (e.g. 80GiB)"
            )
        memory = torch.cuda.get_device_properties(0).total_memory
    from adaptlab.optim_backward import check_one_process

    check_one_process(bool(flags.get("optimizer_in_backward")), gpus)
    precision = flags.get("precision") or "auto"
    device_micro_batch(flags.get("batch") or 4, flags.get("grad_accum") or 1, gpus)  # fail before planning
    return {
        "model": flags["model"],
        "gpus": gpus,
        "memory_per_device": memory,
        "parallel": parallel,
        "batch": flags.get("batch") or 4,
        "grad_accum": flags.get("grad_accum") or 1,
        "seq_len": flags.get("seq_len") or 256,
        "rank": 16 if 16 in ranks else ranks[0],
        "targets": flags.get("targets") or "all-linear",
        "precision": "fp32" if precision == "fp32" else "bf16",
        "grad_checkpointing": bool(flags.get("grad_checkpointing")),
        "task": flags.get("task"),
        "dropout": flags.get("dropout") or 0.0,
        "compile": flags.get("compile", "auto"),
    }
