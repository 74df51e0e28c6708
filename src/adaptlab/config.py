"""Validated run configuration: ModelSpec, MethodSpec, DataSpec, TrainSpec, ObjectiveSpec and RunConfig.

A run is fully described by a RunConfig; `adaptlab train` writes the resolved one to RUN/config.yaml
and re-running that file reproduces the run. User values are validated here, where they enter, and
a bad value becomes one UserError line naming the field and the fix. Values are strictly typed
(`steps: true` or `rank: "8"` is refused, not coerced); an int is accepted where a float is expected.

This is the one definition of every field: compare's specs (compare/spec.py) derive theirs from
these classes, and the LR rule (`default_lr`) and the LoRA family (`is_lora`) live only here.

    python -c "from adaptlab.config import RunConfig; print(RunConfig(data={'train': ['python-stdlib']}))"
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from adaptlab.errors import UserError

Method = Literal["full", "lora", "dora", "qlora"]
METHODS: tuple[str, ...] = get_args(Method)
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Task = Literal["sft", "dpo", "grpo"]
TASKS: tuple[str, ...] = get_args(Task)
DpoLoss = Literal["sigmoid", "ipo"]
DPO_LOSSES: tuple[str, ...] = get_args(DpoLoss)
TARGET_PRESETS = ("attention", "mlp", "all-linear")
LORA_FAMILY = ("lora", "dora", "qlora")
FULL_LR = 2e-5
"""Default peak LR of full fine-tuning."""
LORA_LR_FACTOR = 10.0
"""The LoRA family's default LR is this multiple of full fine-tuning's (Schulman et al. 2025)."""
COMPARE_SEEDS = 3
"""Replicates per arm of a comparison (and of each comparison `adaptlab reproduce` runs): one seed's
difference between arms cannot be told from seed-to-seed noise, so a single seed is reported as
unreplicated."""
RANK_SCALINGS = ("rslora", "alpha-2r")
"""How the rank study scales each rank's update: rslora (alpha/sqrt(r) with one alpha for every rank, so
the update scale stays fixed across ranks) or alpha-2r (alpha = 2 x rank, the LoRA default: alpha/r = 2)."""
EVAL_DOCS = 64
"""Held-out target documents, and general-probe documents, a comparison scores: at 16 a paired
interval's coverage depends on how skewed the per-document differences are (bench/interval_coverage.py);
at 64 it holds."""


def is_lora(method: str) -> bool:
    """Whether a method trains low-rank adapters on a frozen base (lora, dora, qlora)."""
    return method in LORA_FAMILY


LORA_FIELDS = ("rank", "alpha", "dropout", "rslora", "targets")
"""MethodSpec fields only the LoRA family uses: given with full fine-tuning they are refused, not ignored."""


def lora_fields_misused(method: str, given: Iterable[str]) -> list[str]:
    """The LoRA-family-only fields among `given` when `method` trains every weight (none for the LoRA family)."""
    given = set(given)
    return [] if is_lora(method) else [f for f in LORA_FIELDS if f in given]


def default_lr(method: str, base_lr: float = FULL_LR, factor: float = LORA_LR_FACTOR) -> float:
    """The LR rule: full fine-tuning at base_lr, the LoRA family at factor x base_lr."""
    return base_lr * factor if is_lora(method) else base_lr


def optional(spec: type[BaseModel], name: str) -> Any:
    """Field `name` of `spec` as an optional override: same bounds and description, default None."""
    return FieldInfo.merge_field_infos(spec.model_fields[name], default=None)


class _Spec(BaseModel):
    # strict: YAML `steps: true` or `rank: "8"` is refused instead of coerced to 1 or 8
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelSpec(_Spec):
    name: str = "tiny-random"
    """Embedded name (smollm2-135m, tiny-random), local HF directory or hub id."""
    init_from: str | None = None
    """A finished run directory on the same base whose weights this run starts from (init_from.py)."""


class MethodSpec(_Spec):
    method: Method = "lora"
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
        return is_lora(self.method)


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

    @field_validator("train")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one data source")
        return v


class LrChange(_Spec):
    step: int = Field(ge=0)
    """Optimizer steps taken when the change applies."""
    lr: float = Field(gt=0)
    """The new peak learning rate (warmup and cosine decay still scale it)."""


SEED_MAX = 2**32 - 1
"""The largest seed: numpy.random.seed (which train.seed_everything calls) takes 0 to 2**32 - 1."""


class StepSpec(_Spec):
    """How each optimizer step is taken: the settings one run and every arm of a comparison share."""

    batch: int = Field(4, gt=0)
    """Sequences per micro-batch (per device)."""
    grad_accum: int = Field(1, gt=0)
    seq_len: int = Field(256, ge=8)
    warmup: float = Field(0.05, ge=0.0, lt=1.0)
    """Warmup as a fraction of the steps; then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """Seeds the data order, LoRA initialisation, dropout and sampling; numpy's global seed bounds it."""
    precision: Precision = "auto"
    """auto: bf16 autocast (fp32 master weights) on CUDA and CPUs with native bf16, else fp32."""
    grad_checkpointing: bool = False
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each decoder layer (compiling.py); auto: only where measured to pay back, a long
    single-process SFT run in bf16 on a CPU with native bf16 (compiling.auto_blockers)."""

    optimizer_in_backward: bool = False
    """Apply each parameter's AdamW update as soon as its gradient is complete and free that gradient
    (optim_backward.py), so the gradients are never all held at once. Global-norm clipping needs them
    all first: max_grad_norm is null with it (left at its default it is dropped; set, it is refused)."""
    eval_examples: int = Field(32, gt=0)
    """Validation blocks scored at each evaluation."""

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_setting(cls, value: Any) -> Any:
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"true, false or auto (got {value!r})")

    @model_validator(mode="before")
    @classmethod
    def _no_default_clip_in_backward(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("optimizer_in_backward") is True
            and "max_grad_norm" not in data
        ):
            return {**data, "max_grad_norm": None}  # the default clipping cannot apply to in-backward updates
        return data

    @model_validator(mode="after")
    def _clip_or_in_backward(self) -> StepSpec:
        if self.optimizer_in_backward and self.max_grad_norm is not None:
            raise ValueError(
                "can't clip gradients (max_grad_norm) with optimizer_in_backward: each update is applied "
                "before the global norm is known. Choose one (max_grad_norm: null)"
            )
        return self


class TrainSpec(StepSpec):
    steps: int | None = Field(None, gt=0)
    """Optimizer steps; give this or tokens (the budget)."""
    tokens: int | None = Field(None, gt=0)
    """Token budget: steps = ceil(tokens / (batch * grad_accum * seq_len))."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate; default `default_lr`: FULL_LR for full, LORA_LR_FACTOR x it for the LoRA family."""
    save_every: int | None = Field(None, gt=0)
    """Checkpoint every N steps (None: only at the end of training)."""
    eval_every: int | None = Field(None, gt=0)
    """Validation loss every N steps (None: at the end only)."""
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


class ObjectiveSpec(_Spec):
    """What a step minimises (adaptlab/objectives): the task and the settings of its loss."""

    task: Task = "sft"
    """sft: next-token loss on text or responses; dpo: preference pairs; grpo: sampled, rewarded completions."""
    beta: float = Field(0.1, gt=0)
    """DPO: strength of the implicit KL to the reference (the rewards are beta x log-ratio)."""
    loss: DpoLoss = "sigmoid"
    """DPO loss: sigmoid (Rafailov et al. 2023) or ipo (Azar et al. 2023), as TRL defines them."""
    group_size: int = Field(8, ge=2)
    """GRPO: completions sampled per prompt (rewards are normalised within the group, so at least 2)."""
    max_new_tokens: int = Field(32, gt=0)
    """GRPO: the longest completion sampled."""
    temperature: float = Field(1.0, gt=0)
    """GRPO: sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1.0)
    """GRPO: nucleus sampling mass."""
    clip_eps: float = Field(0.2, gt=0)
    """GRPO: the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]."""
    kl_beta: float = Field(0.0, ge=0)
    """GRPO: weight of the KL penalty to the reference (0: none, no reference pass)."""
    reward: str = "exact"
    """GRPO: exact | regex (against the row's `answer`) | python:module:function."""
    prompts_per_step: int | None = Field(None, gt=0)
    """GRPO: prompts per optimizer step (default: the global batch)."""


class RunConfig(_Spec):
    model: ModelSpec = Field(default_factory=ModelSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    out: str | None = None
    """Run directory."""

    def resolved_lr(self) -> float:
        return self.train.lr if self.train.lr is not None else default_lr(self.method.method)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if not self.train.lr_changes:  # so the config.yaml of a run without changes reads as before
            del data["train"]["lr_changes"]
        return yaml.safe_dump(data, sort_keys=False)


def field_error(err: ValidationError) -> tuple[str, str]:
    """(dotted field path, message) of the first error; a wrong type names the value that was given."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"].endswith("_type") or first["type"] in ("literal_error", "bool_parsing"):
        msg += f" (got {_shown(first.get('input'))})"
    return where, msg


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def check_seq_len(seq_len: int, positions: int | None, model: str) -> None:
    """A sequence longer than the model's position table is refused."""
    if isinstance(positions, int) and seq_len > positions:
        raise UserError(
            f"--seq-len {seq_len} exceeds the {positions:,} positions of {model} "
            f"(max_position_embeddings): use --seq-len {positions} or less"
        )


def check_rank(rank: int, shapes: dict[str, tuple[int, int]], flag: str = "--rank") -> None:
    """A LoRA rank above min(in, out) of a targeted Linear (shapes: path -> (in, out)) is refused."""
    if not shapes:
        return
    name, (d_in, d_out) = min(shapes.items(), key=lambda kv: min(kv[1]))
    limit = min(d_in, d_out)
    if rank > limit:
        raise UserError(
            f"{flag} {rank} exceeds {limit}, the smallest dimension of the targeted Linear modules "
            f"({name.rsplit('.', 1)[-1]}: {d_in} in, {d_out} out); an update of higher rank cannot exist "
            f"there: use a rank of {limit} or less"
        )


def _describe(err: ValidationError) -> str:
    where, msg = field_error(err)
    return f"config field {where or 'config'}: {msg}"


def build_config(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from a plain dict (from YAML or flags); errors name the field."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err)) from err


class _Loader(yaml.SafeLoader):
    """YAML 1.1 with YAML 1.2 floats: `1e-3` and `2E5` are numbers, not strings (values are strictly typed),
    and a key given twice in one mapping refused (YAML 1.2 forbids it; PyYAML keeps the last silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by own keys
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says what is wrong with it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """A YAML document (safe types only) with YAML 1.2 float syntax."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Read a YAML mapping into a dict (validated later, after flags are merged in); `what` names it in errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"{what} {p}:{line}: not UTF-8 text (byte {err.start})") from err
    except OSError as err:
        raise UserError(f"{what} {p}: cannot read ({err.strerror})") from err
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        twice = str(getattr(err, "problem", "")) if "given twice" in str(getattr(err, "problem", "")) else ""
        raise UserError(f"{what} {p}{line}: {twice or 'not valid YAML'}") from err
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {p}: expected a mapping at the top level")
    if (where := _unpaired_surrogate(data)) is not None:
        raise UserError(
            f"{what} {p}: {where} holds an unpaired surrogate (a \\uD800-\\uDFFF escape), which is not text"
        )
    return data


def _unpaired_surrogate(value: Any, where: str = "") -> str | None:
    """The dotted path of the first string (key or value) that cannot be UTF-8 text, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "a value"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}" if where else str(key)
        if (found := _unpaired_surrogate(key, path) if isinstance(key, str) else None) is not None:
            return found
        if (found := _unpaired_surrogate(item, path)) is not None:
            return found
    return None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides (flags the user gave) into base (the YAML file)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
