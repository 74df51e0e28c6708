"""One training arm and the shape of its step: what every estimate of plan/ is a function of.

An `Arm` is a method (full, LoRA, DoRA, QLoRA) with its rank and targets; a `Shape` the micro-batch,
precision, device and options of the step. Also here: the config `adaptlab train` would run for them
(`run_config`), the transforms it would apply (`eager`, adaptlab.transforms), the trainable and
held-in-bf16 parameter counts, and the size of what training writes (`artifact_bytes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adaptlab.config import RunConfig, build_config, is_lora
from adaptlab.plan.arch import Arch
from adaptlab.transforms import Transforms, decide

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
