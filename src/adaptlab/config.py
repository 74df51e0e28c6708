"""Validated run configuration: ModelSpec, MethodSpec, DataSpec, TrainSpec and RunConfig.

A run is fully described by a RunConfig; `adaptlab train` writes the resolved one to RUN/config.yaml
and re-running that file reproduces the run. User values are validated here, where they enter, and
a bad value becomes one UserError line naming the field and the fix.

    python -c "from adaptlab.config import RunConfig; print(RunConfig(data={'train': ['python-stdlib']}))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adaptlab.errors import UserError

METHODS = ("full", "lora", "dora", "qlora")
TARGET_PRESETS = ("attention", "mlp", "all-linear")
PRECISIONS = ("auto", "fp32", "bf16")
LORA_FAMILY = ("lora", "dora", "qlora")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Spec):
    name: str = "tiny-random"
    """Embedded name (smollm2-135m, tiny-random), local HF directory or hub id."""


class MethodSpec(_Spec):
    method: Literal["full", "lora", "dora", "qlora"] = "lora"
    """full: every weight trains; lora/dora/qlora: low-rank adapters on a frozen base (qlora: 4-bit base)."""
    rank: int = Field(16, gt=0)
    """LoRA rank r."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha; default 2 * rank. The update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023)."""
    targets: str | list[str] = "all-linear"
    """attention | mlp | all-linear | a list of Linear module names (e.g. [q_proj, v_proj])."""

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and "," in v:
            v = [t.strip() for t in v.split(",") if t.strip()]
        if isinstance(v, list) and not v:
            raise ValueError("empty target list")
        return v

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def is_lora(self) -> bool:
        return self.method in LORA_FAMILY


class DataSpec(_Spec):
    train: list[str] = Field(default_factory=lambda: ["python-stdlib"])
    """Sources: files, directories, globs, datasets dirs, hub names, or the embedded python-stdlib."""
    text_field: str = "text"
    val_frac: float = Field(0.05, ge=0.0, lt=0.5)
    test_frac: float = Field(0.05, ge=0.0, lt=0.5)

    @field_validator("train", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LrChange(_Spec):
    step: int = Field(ge=0)
    """Optimizer steps taken when the change applies."""
    lr: float = Field(gt=0)
    """The new peak learning rate (warmup and cosine decay still scale it)."""


class TrainSpec(_Spec):
    steps: int | None = Field(None, gt=0)
    """Optimizer steps; give this or tokens (the budget)."""
    tokens: int | None = Field(None, gt=0)
    """Token budget: steps = ceil(tokens / (batch * grad_accum * seq_len))."""
    batch: int = Field(4, gt=0)
    """Sequences per micro-batch (per device)."""
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(256, ge=8)
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default 2e-5 for full, 2e-4 (10x) for the LoRA family."""
    warmup: float = Field(0.05, ge=0.0, lt=1.0)
    """Warmup as a fraction of the steps; then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast (fp32 master weights) on CUDA and CPUs with native bf16, else fp32."""
    grad_checkpointing: bool = False
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every N steps (None: only at the end of training)."""
    eval_every: int | None = Field(None, gt=0)
    """Validation loss every N steps (None: at the end only)."""
    eval_examples: int = Field(32, gt=0)
    """Validation blocks scored at each evaluation."""
    log_every: int = Field(1, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    lr_changes: list[LrChange] = Field(default_factory=list)
    """Peak LR replaced from a step on, as `adaptlab train --resume RUN --lr X` records it."""

    @model_validator(mode="after")
    def _budget(self) -> TrainSpec:
        if self.steps is not None and self.tokens is not None:
            raise ValueError("can't provide both steps and tokens: choose one budget")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.grad_accum * self.seq_len

    def total_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, -(-self.tokens // self.tokens_per_step))
        return 100


class RunConfig(_Spec):
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    out: str | None = None
    """Run directory."""

    def resolved_lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 2e-4 if self.method.is_lora else 2e-5

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if not self.train.lr_changes:  # so the config.yaml of a run without changes reads as before
            del data["train"]["lr_changes"]
        return yaml.safe_dump(data, sort_keys=False)


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"config field {where}: {first['msg']}"


def build_config(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a plain dict (from YAML or flags); errors name the field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err)) from err


def load_config(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping into a dict (validated later, after flags are merged in); `what` names it in errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {p}{line}: not valid YAML") from err
    if not isinstance(data, dict):
        raise UserError(f"{what} {p}: expected a mapping at the top level")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides (flags the user gave) into base (the YAML file)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
