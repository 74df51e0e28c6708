"""Which optimisations a run gets: fused LoRA / norm / Linear kernels, a frozen base held in bf16, compile.

`transforms_for(config, device, precision, strategy, base_params)` is the one place that decides; train
applies what it says (train.prepare) and the planner models the same paths (plan/planner.py, plan/world.py),
so `adaptlab plan` reports what `adaptlab train` will do. Each decision carries a line saying why.

The rules: torch.compile (compiling.resolve; `auto` weighs compiling.auto_blockers) replaces the fused
autograd functions, which it would otherwise trace as opaque calls: a compiled run fuses no LoRA, norm or
Linear and keeps the SwiGLU product. FSDP2 shards the parameters it wraps, so under it no Linear saves its
uncast input, no norm rebuilds its output, and nothing is held in bf16. Activation checkpointing
recomputes each block itself: no norm rebuilds, and the MLP keeps its product. Held bf16 weights are the
values bf16 autocast reads anyway: only at bf16, only for the LoRA family (full fine-tuning freezes none).

    python -c "from adaptlab.transforms import decide; print(decide(method='lora', device_type='cpu', \
precision='bf16', strategy=None, compile=False, grad_checkpointing=False))"
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from adaptlab import compiling
from adaptlab.config import RunConfig, is_lora


@dataclass(frozen=True)
class Transforms:
    """What a run's model gets before its first step (train.prepare applies each one that is true)."""

    compile: bool
    """torch.compile each decoder layer (compiling.compile_layers)."""
    fuse_lora: bool
    """LoRA / DoRA / QLoRA Linears take the fused forward (fused_lora.fuse_loras)."""
    fuse_norms: bool
    """Decoder norms keep their input only and rebuild their output in backward (fused_norm.fuse_norms)."""
    fuse_linears: bool
    """Trained Linears in decoder layers save their uncast input under autocast (autocast_linear)."""
    recompute_mlp_product: bool
    """The fused SwiGLU MLP rebuilds its product in backward (fused.fuse_mlps; it is fused either way)."""
    hold_base_bf16: bool
    """Frozen Linear weights held in bf16 (frozen_base.hold_frozen_linears)."""
    load_held: bool
    """The base loaded with its bf16 Linears as stored, never whole in fp32 (frozen_base.load_held)."""
    cpu_attention: bool
    """torch's flash attention forward with adaptlab's backward on a CPU at bf16 (cpu_attention)."""
    why: dict[str, str] = field(default_factory=dict, compare=False)
    """A line per decision above, keyed by its field name."""


def loads_held(method: str, precision: str, strategy: str | None) -> bool:
    """Whether the base is loaded held (Transforms.load_held): known before the model is loaded."""
    return precision == "bf16" and strategy != "fsdp" and method == "lora"


def transforms_for(
    config: RunConfig, device: torch.device, precision: str, strategy: str | None, base_params: int
) -> Transforms:
    """What the run of `config` gets on `device` at `precision` under `strategy` (None: one process,
    ddp, fsdp), its base having `base_params` parameters (train.compile `auto` weighs the run's work)."""
    t = config.train
    task = config.objective.task
    blockers = compiling.auto_blockers(
        method=config.method.method,
        device=device,
        precision=precision,
        world_size=1 if strategy is None else 2,  # a strategy means several processes (resolve_parallel)
        task=task,
        grad_checkpointing=t.grad_checkpointing,
        optimizer_in_backward=t.optimizer_in_backward,
        work=float(base_params) * t.total_steps() * t.tokens_per_step,
    )
    compiled, why = compiling.resolve(t.compile, blockers)
    decided = decide(
        method=config.method.method,
        device_type=device.type,
        precision=precision,
        strategy=strategy,
        compile=compiled,
        grad_checkpointing=t.grad_checkpointing,
    )
    return replace(decided, why={**decided.why, "compile": why})


def decide(
    *,
    method: str,
    device_type: str,
    precision: str,
    strategy: str | None,
    compile: bool,
    grad_checkpointing: bool,
) -> Transforms:
    """Every decision but whether to compile, which is given (transforms_for resolves train.compile)."""
    eager = not compile
    sharded = strategy == "fsdp"
    lora = is_lora(method)
    bf16 = precision == "bf16"
    rules: dict[str, tuple[bool, str, list[tuple[bool, str]]]] = {
        "fuse_lora": (
            lora and eager,
            "fused LoRA Linears",
            [(not lora, "no adapters"), (compile, "compiled")],
        ),
        "fuse_norms": (
            eager and not sharded and not grad_checkpointing,
            "fused norms",
            [(compile, "compiled"), (sharded, "FSDP2"), (grad_checkpointing, "activation checkpointing")],
        ),
        "fuse_linears": (
            eager and not sharded,
            "Linears saving uncast inputs",
            [(compile, "compiled"), (sharded, "FSDP2")],
        ),
        "recompute_mlp_product": (
            eager and not grad_checkpointing,
            "SwiGLU product rebuilt in backward",
            [(compile, "compiled"), (grad_checkpointing, "activation checkpointing")],
        ),
        "hold_base_bf16": (
            bf16 and not sharded and lora,
            "frozen Linears held in bf16",
            [(not bf16, precision), (sharded, "FSDP2"), (not lora, "full fine-tuning freezes none")],
        ),
        "load_held": (
            loads_held(method, precision, strategy),
            "bf16 Linears loaded as stored",
            [
                (not bf16, precision),
                (sharded, "FSDP2"),
                (bf16 and not sharded, f"only lora's base, not {method}'s"),
            ],
        ),
        "cpu_attention": (
            bf16 and device_type == "cpu",
            "CPU flash attention",
            [(not bf16, precision), (device_type != "cpu", device_type)],
        ),
    }
    why = {"compile": f"compile: {'on' if compile else 'off'}"}
    why.update({name: _why(*rule) for name, rule in rules.items()})
    return Transforms(compile=compile, **{name: rule[0] for name, rule in rules.items()}, why=why)


def _why(on: bool, what: str, reasons: list[tuple[bool, str]]) -> str:
    """`what: on`, or `what: off (the reasons that hold)`."""
    if on:
        return f"{what}: on"
    return f"{what}: off ({', '.join(text for holds, text in reasons if holds)})"
