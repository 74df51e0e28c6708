"""The comparison spec (compare.yaml): base model, target data, general probes, budget and arms.

Validated by pydantic where it enters; a bad value becomes one UserError line naming the field,
e.g. `compare.yaml field arms.1.method: Input should be 'full', 'lora', 'dora' or 'qlora'`.

    model: smollm2-135m
    data: {train: [python-stdlib]}
    drift: true                       # KL(base || tuned) on text sampled from the base
    general: [../shared/data/general/wordnet_glosses.jsonl]
    tokens: 20000                     # the budget: tokens every arm sees
    train: {batch: 4, seq_len: 128, lr: 2.0e-5}
    arms:
      - {name: full, method: full}
      - {name: lora, method: lora, rank: 8}
      - {name: lora-attn, method: lora, targets: attention, match_params: lora}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from adaptlab import config
from adaptlab.config import (
    COMPARE_SEEDS,
    EVAL_DOCS,
    FULL_LR,
    LORA_FIELDS,
    LORA_LR_FACTOR,
    RANK_SCALINGS,
    Method,
    MethodSpec,
    StepSpec,
    TrainSpec,
    field_error,
    lora_fields_misused,
    optional,
)
from adaptlab.errors import UserError

STUDIES = ("methods", "rank", "lr", "batch", "targets", "data-size", "regime", "continual")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ArmSpec(MethodSpec):
    """One arm: a MethodSpec (rank, alpha, dropout, rslora, targets) plus what a study varies per arm.

    The method is required; the TrainSpec fields an arm may override (lr, batch, grad_accum, tokens)
    keep TrainSpec's bounds and default to None: take the comparison's value.
    """

    name: str
    method: Method
    match_params: str | None = None
    """Name of another arm: this arm's rank is raised (or lowered) so its trainable params match that arm's."""
    lr: float | None = optional(TrainSpec, "lr")
    """Peak LR. Default: the comparison's base LR for full, lora_lr_factor x it for the LoRA family."""
    lr_sweep: list[float] | None = None
    """Train at each LR and keep the best by validation loss (the sweep is reported)."""
    sweep_every_seed: bool = False
    """Sweep the LR at every seed (the LR study), not only the first: the best LR is picked on the
    seeds' mean validation loss and each seed's optimum is fitted; off, the other seeds train at the
    first seed's best LR."""
    batch: int | None = optional(TrainSpec, "batch")
    """Differs from the comparison's only in a batch study."""
    grad_accum: int | None = optional(TrainSpec, "grad_accum")
    tokens: int | None = optional(TrainSpec, "tokens")
    """This arm's budget in tokens; differs from the comparison's only where a study is about budget."""
    data_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Train on this nested fraction of the training documents (data-size study)."""
    epochs: float | None = Field(None, gt=0)
    """With data_fraction: epochs over the subset (the budget follows from the subset's size)."""
    label: str | None = None
    """What the arm varies, for study plots (e.g. the rank or the batch size)."""
    data: list[str] | None = None
    """Train this arm on these sources instead of the comparison's data; it is then measured on the
    comparison's target and on its own data's held-out split (own_learning)."""
    init_from: str | None = None
    """Name of another arm: each run of this arm starts from that arm's run of the same seed."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "arm names use letters, digits, '.', '_' and '-' and start with a letter or digit"
            )
        if v.endswith((".yaml", ".log")):  # runs/NAME.yaml and runs/NAME.log sit beside each run's folder
            raise ValueError("an arm name may not end in .yaml or .log (the names of each run's own files)")
        return v

    @field_validator("lr_sweep")
    @classmethod
    def _sweep(cls, v: list[float] | None) -> list[float] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("lr_sweep needs at least two learning rates")
            if any(x <= 0 for x in v):
                raise ValueError("learning rates must be positive")
            if len(set(v)) != len(v):
                raise ValueError("lr_sweep has repeated values")
        return v

    @model_validator(mode="after")
    def _lora_fields(self) -> ArmSpec:
        for field in lora_fields_misused(self.method, self.model_fields_set):
            raise ValueError(
                f"arm {self.name}: {field} applies to the LoRA family (method lora, dora or qlora); "
                f"this arm is method {self.method}: drop {field}"
            )
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A full arm is written without the LoRA fields, so a written spec reads back."""
        out: dict[str, Any] = handler(self)
        if not self.is_lora:
            for field in LORA_FIELDS:
                out.pop(field, None)
        return out

    @model_validator(mode="after")
    def _one_lr(self) -> ArmSpec:
        if self.lr is not None and self.lr_sweep is not None:
            raise ValueError("can't provide both lr and lr_sweep: choose one")
        if self.sweep_every_seed and self.lr_sweep is None:
            raise ValueError(f"arm {self.name}: sweep_every_seed needs lr_sweep (the LRs to sweep)")
        if self.epochs is not None and self.data_fraction is None:
            raise ValueError("epochs needs data_fraction (epochs over a subset of the data)")
        if self.data is not None and self.data_fraction is not None:
            raise ValueError("can't provide both data and data_fraction: choose one")
        if self.data_fraction is not None and self.tokens is not None:
            raise ValueError(
                "can't provide both data_fraction and tokens: the subset and its epochs set the budget"
            )
        return self

    def method_spec(self) -> MethodSpec:
        """The arm as the MethodSpec of its runs (full: the method alone)."""
        if not self.is_lora:
            return MethodSpec(method="full")
        return MethodSpec.model_validate(self.model_dump(include=set(MethodSpec.model_fields)))


class DataSpec(config.DataSpec):
    """Target-domain data: split by document into train / val / test (test is held out for learning)."""

    @field_validator("test_frac")
    @classmethod
    def _test_split(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be greater than 0: learning is measured on the held-out test split")
        return v


class TrainSettings(StepSpec):
    """Training settings shared by every arm (the same tokens in the same order): a run's StepSpec plus
    the LR rule and how often each run evaluates and checkpoints."""

    lr: float = Field(FULL_LR, gt=0)
    """Base LR: full fine-tuning uses it, the LoRA family lora_lr_factor x it, unless an arm says otherwise."""
    lora_lr_factor: float = Field(LORA_LR_FACTOR, gt=0)
    eval_points: int = Field(5, ge=1)
    """Validation losses per run (evenly spaced), for the loss curves."""
    checkpoints: int = Field(2, ge=0)
    """Resumable checkpoints per run (evenly spaced; 0: an interrupted arm restarts)."""

    def default_lr(self, method: str) -> float:
        return config.default_lr(method, self.lr, self.lora_lr_factor)


class EvalSettings(_Spec):
    """How learning and forgetting are measured per arm."""

    max_docs: int = Field(EVAL_DOCS, gt=0)
    """Held-out target documents (and general documents) scored."""
    max_chars: int | None = Field(6000, gt=0)
    """Each scored document is cut to its first max_chars characters."""
    seq_len: int = Field(512, ge=8)
    batch: int = Field(8, gt=0)
    drift_prompts: int | None = Field(None, gt=0)
    """Use this many of the shipped general prompts (evenly spread) for drift; default all."""
    drift_tokens: int = Field(64, gt=0)
    mc_limit: int | None = Field(None, gt=0)
    target_kl: bool = True
    """KL both ways between each arm and the base on the held-out target text (the forgetting predictor's
    input): about as costly as scoring the target twice more."""


class AnalysisSettings(_Spec):
    enabled: bool = True
    k: int = Field(10, gt=0)
    eps: float = Field(0.5, gt=0.0, le=1.0)


class Limits(_Spec):
    """Constraints the recommendation honours when given."""

    forgetting: float | None = Field(None, ge=0.0)
    """Largest acceptable forgetting (in the forgetting metric's unit: nats/token)."""
    memory_gb: float | None = Field(None, gt=0.0)
    """Largest acceptable peak training memory in GB."""


class CompareSpec(_Spec):
    model: str = "tiny-random"
    data: DataSpec
    general: list[str] = Field(default_factory=list)
    """General-domain text: forgetting = tuned - base NLL on it."""
    drift: bool = True
    """Measure drift, KL(base || tuned), on text sampled from the base (or on drift_data)."""
    drift_data: list[str] | None = None
    mc: list[str] = Field(default_factory=list)
    """Multiple-choice JSONL files of general ability: forgetting = accuracy drop."""
    tokens: int = Field(gt=0)
    """The budget: tokens every arm sees (equal across arms unless the study is about budget)."""
    seeds: int = Field(COMPARE_SEEDS, ge=1)
    """Replicates per arm (seed s of every arm sees the same data order); 1 is reported as unreplicated."""
    target_tokens: int | None = Field(None, gt=0)
    """Extrapolate arms measured at several budgets (e.g. the data-size study) to this many tokens."""
    study: str | None = None
    rank_scaling: str = "rslora"
    lr_grid: list[float] | None = None
    """The LR study's grid as multiples of the base LR (train.lr), the same for full and LoRA; default
    arms.LR_GRID. A best LR on the grid's edge still extends the sweep."""
    """The rank study's update scaling (RANK_SCALINGS): rslora keeps it fixed across ranks; alpha-2r is the
    LoRA default alpha = 2 x rank."""
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    limits: Limits = Field(default_factory=Limits)
    arms: list[ArmSpec] = Field(default_factory=list)
    study_data: list[str] = Field(default_factory=list)
    """The second data set a study needs: regime: the target domain as instruction pairs (data is the
    same domain as raw text); continual: domain B, trained after data (domain A)."""

    @field_validator("general", "mc", "study_data", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("lr_grid")
    @classmethod
    def _lr_grid(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) < 3 or any(x <= 0 for x in v) or len(set(v)) != len(v)):
            raise ValueError("lr_grid needs at least three distinct positive multiples of the base LR")
        return v

    @field_validator("rank_scaling")
    @classmethod
    def _rank_scaling(cls, v: str) -> str:
        if v not in RANK_SCALINGS:
            raise ValueError(f"unknown rank scaling {v!r}; choose one of {', '.join(RANK_SCALINGS)}")
        return v

    @field_validator("study")
    @classmethod
    def _study(cls, v: str | None) -> str | None:
        if v is not None and v not in STUDIES:
            raise ValueError(f"unknown study {v!r}; choose one of {', '.join(STUDIES)}")
        return v

    @model_validator(mode="after")
    def _arms(self) -> CompareSpec:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arm names must be unique; repeated: {', '.join(dup)}")
        for arm in self.arms:
            if arm.match_params is not None:
                if arm.match_params not in names:
                    raise ValueError(f"arm {arm.name}: match_params names no arm ({arm.match_params!r})")
                if not arm.is_lora:
                    raise ValueError(f"arm {arm.name}: match_params applies to LoRA-family arms only")
        for arm in self.arms:
            step = (arm.batch or self.train.batch) * (arm.grad_accum or self.train.grad_accum)
            step *= self.train.seq_len
            if arm.tokens is not None and arm.tokens < step:
                raise ValueError(
                    f"arm {arm.name}: tokens {arm.tokens:,} is less than one optimizer step (batch x "
                    f"grad_accum x seq_len = {step:,} tokens): give tokens of at least {step:,}"
                )
        for arm in self.arms:
            if arm.init_from is not None:
                _check_init_from(arm, {a.name: a for a in self.arms})
        if self.study in ("regime", "continual") and not self.arms and not self.study_data:
            raise ValueError(f"study {self.study} needs study_data (--study-data): see compare/arms.py")
        if self.study_data and (self.study not in ("regime", "continual") or self.arms):
            raise ValueError(
                "study_data (--study-data) is the second data set of the regime and continual studies, "
                "which build their own arms; this comparison would not use it"
            )
        if not self.arms and self.study is None:
            raise ValueError("give a list of arms or a study")
        if self.lr_grid is not None and (self.study != "lr" or self.arms):
            raise ValueError(
                "lr_grid is the grid of the lr study's own arms (study: lr, no arms): drop lr_grid"
            )
        if self.rank_scaling != "rslora" and self.study != "rank":
            raise ValueError("rank_scaling (--rank-scaling) applies to the rank study only")
        if not (self.general or self.drift or self.mc):
            raise ValueError("no general probe: set drift: true, or give general text or mc files")
        return self


def _check_init_from(arm: ArmSpec, by_name: dict[str, ArmSpec]) -> None:
    src = by_name.get(arm.init_from or "")
    if src is None or src.name == arm.name:
        raise ValueError(f"arm {arm.name}: init_from names no other arm ({arm.init_from!r})")
    if src.init_from is not None:
        raise ValueError(
            f"arm {arm.name}: init_from points at {src.name}, which itself starts from another arm"
        )
    if src.lr_sweep is not None or arm.lr_sweep is not None:
        raise ValueError(f"arm {arm.name}: init_from and lr_sweep do not go together")
    if arm.is_lora and not src.is_lora:
        raise ValueError(f"arm {arm.name}: a LoRA-family arm can start from a LoRA-family arm only")


def describe(err: ValidationError, source: str = "compare.yaml") -> str:
    """One line naming the first bad field and what is wrong with it."""
    where, msg = field_error(err)
    if err.errors()[0]["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see examples/compare.yaml)"
    return f"{source} field {where or 'top level'}: {msg}"


def build_spec(data: dict[str, Any], source: str = "compare.yaml") -> CompareSpec:
    try:
        return CompareSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(describe(err, source)) from err


def load_spec_file(path: str | Path) -> dict[str, Any]:
    return config.load_config(path, what="compare config")


# `adaptlab demo`: sized (arms, one seed, steps, seq_len, eval docs, drift prompts) to finish in about 15
# minutes on a 2-core CPU, so its report says its differences are unreplicated; bench numbers in docs/benchmarks.md
# come from running it.
DEMO_TOKENS = 6_144
DEMO_FULL_LR = 1e-4
"""The demo's LRs come from a sweep at its own budget (docs/benchmarks.md, `make demo`): on python-stdlib at 6,144
tokens the best of {2e-5, 1e-4, 3e-4} for full fine-tuning was 1e-4 and the best of {2e-4, 1e-3, 3e-3}
for LoRA r=16 was 1e-3 (lowest validation loss, both inside their grids), so the LoRA family trains at
10x (the default lora_lr_factor)."""


def demo_spec(tokens: int = DEMO_TOKENS) -> dict[str, Any]:
    """LoRA vs full on smollm2-135m, python-stdlib as the target, drift as the general probe: full
    fine-tuning, LoRA r=16 all-linear, attention-only LoRA at matched trainable parameters and DoRA, each
    at its swept LR (rsLoRA and QLoRA are in `adaptlab compare --study methods`)."""
    arms = [
        {"name": "full", "method": "full"},
        {"name": "lora", "method": "lora", "rank": 16},
        {"name": "lora-attn", "method": "lora", "targets": "attention", "match_params": "lora"},
        {"name": "dora", "method": "dora", "rank": 16},
    ]
    return {
        "model": "smollm2-135m",
        "data": {"train": ["python-stdlib"]},
        "drift": True,
        "study": "methods",
        "arms": arms,
        "tokens": tokens,
        "seeds": 1,
        "train": {
            "batch": 4,
            "seq_len": 128,
            "lr": DEMO_FULL_LR,
            "eval_points": 2,
            "eval_examples": 8,
            "checkpoints": 1,
        },
        "eval": {
            "max_docs": 12,
            "max_chars": 2500,
            "seq_len": 256,
            "drift_prompts": 16,
            "drift_tokens": 48,
            "target_kl": False,
        },
    }
