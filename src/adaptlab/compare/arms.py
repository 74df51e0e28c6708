"""Arms: preset studies, matched trainable parameters, and the expansion of arms into training runs.

An arm is a method plus hyperparameters; a run is one training of one arm at one LR and one seed
(one run directory). Every run of a comparison shares the data, the seed of its replicate, the
sequence length and, unless the study is about batch size, the global batch, so every arm sees
the same tokens in the same order (adaptlab.train's example order is a function of seed and position).

    python -c "from adaptlab.compare.arms import study_arms; print(study_arms('methods', 'tiny-random'))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from adaptlab.compare.spec import ArmSpec, CompareSpec
from adaptlab.config import FULL_LR, StepSpec, check_rank, check_seq_len
from adaptlab.errors import UserError

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LR_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
"""The LR study's grid for full and LoRA alike, as multiples of the base LR: half-decade steps from 0.3x
to 300x, so LoRA's best LR can land below, at or above 10x full's and the claim can fail."""
LR_EVAL_BLOCKS = 16
"""Validation blocks (at least) behind each validation loss of a sweep at every seed (the LR study)."""
DEFAULT_RANK = 16


def qlora_available() -> bool:
    """QLoRA's 4-bit base needs bitsandbytes."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@cache
def _meta_model(model: str) -> Any:
    """The model's module tree on the meta device: Linear shapes without loading weights (built once per
    model name in a process; nothing writes to it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from adaptlab.plan.arch import load_model_config

    config = load_model_config(model)  # outside the meta context: it may build an embedded model
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_seq_len_fits(model: str, seq_len: int) -> None:
    """Refuse a sequence length beyond the model's position table before any arm starts (each arm's own
    run would refuse it, one arm after another)."""
    config = _meta_model(model).config
    check_seq_len(seq_len, getattr(config, "max_position_embeddings", None), model)


def linear_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear a LoRA can target, by full module path."""
    from adaptlab.methods import linear_modules

    return {n: (m.out_features, m.in_features) for n, m in linear_modules(_meta_model(model)).items()}


def lora_params(model: str, targets: str | list[str], rank: int, dora: bool = False) -> int:
    """Trainable parameters of a LoRA on these targets: r * (in + out) per module (+ out for DoRA)."""
    from adaptlab.methods import resolve_targets

    names = set(resolve_targets(_meta_model(model), targets))
    shapes = [s for n, s in linear_shapes(model).items() if n.rsplit(".", 1)[-1] in names]
    return sum(rank * (o + i) + (o if dora else 0) for o, i in shapes)


def matched_rank(model: str, targets: str | list[str], params: int, dora: bool = False) -> int:
    """The rank whose trainable parameters on `targets` come closest to `params`."""
    per_rank = lora_params(model, targets, 1) - lora_params(model, targets, 0)
    extra = lora_params(model, targets, 0, dora)
    return max(1, round((params - extra) / max(per_rank, 1)))


def min_linear_dim(model: str) -> int:
    return min(min(s) for s in linear_shapes(model).values())


def rank_alpha(model: str) -> float:
    """The rank study's one alpha under rsLoRA: 2 x sqrt(default rank), so at the default rank the update
    scale alpha/sqrt(r) is standard LoRA's alpha/r = 2 (the scale the LR rule is set for)."""
    return 2.0 * math.sqrt(min(DEFAULT_RANK, min_linear_dim(model)))


def rank_scaling_of(arms: list[ArmSpec]) -> dict[str, Any]:
    """How the LoRA arms of a rank study scaled their updates: {"rule", "alpha", "text"} for the report."""
    lora = [a for a in arms if a.is_lora]
    alphas = {a.alpha for a in lora}
    if lora and all(a.rslora for a in lora) and len(alphas) == 1 and None not in alphas:
        (alpha,) = alphas
        text = (
            f"rsLoRA: every rank's update is scaled by alpha/sqrt(r) with alpha {alpha:g} at every rank, so "
            "the update scale stays fixed across ranks (rank_scaling: alpha-2r for alpha = 2 x rank)"
        )
        return {"rule": "rslora", "alpha": alpha, "text": text}
    if lora and not any(a.rslora for a in lora) and alphas == {None}:
        text = (
            "alpha = 2 x rank, the LoRA default: alpha/r = 2 at every rank (rank_scaling: rslora for rsLoRA)"
        )
        return {"rule": "alpha-2r", "alpha": None, "text": text}
    return {"rule": "per-arm", "alpha": None, "text": "each arm's own alpha and scaling (see its config)"}


def study_arms(
    study: str,
    model: str,
    tokens: int = 0,
    base_lr: float = FULL_LR,
    study_data: list[str] | None = None,
    rank_scaling: str = "rslora",
    lr_grid: list[float] | None = None,
) -> list[ArmSpec]:
    """The ready-made arm list of a study (sized to the model and, for rank, to the budget)."""
    r = min(DEFAULT_RANK, min_linear_dim(model))
    if study in ("regime", "continual"):
        make = regime_arms if study == "regime" else continual_arms
        return make(r, tokens, list(study_data or []))
    if study == "methods":
        return methods_arms(r)
    if study == "rank":
        return rank_arms(model, tokens, rank_scaling)
    if study == "lr":
        return lr_arms(r, base_lr, lr_grid)
    if study == "batch":
        return batch_arms(r)
    if study == "targets":
        return targets_arms(r)
    if study == "data-size":
        return data_size_arms(model)
    raise UserError(f"unknown study {study!r}")


def methods_arms(rank: int) -> list[ArmSpec]:
    """The methods study: full, LoRA (all linear and attention only at matched parameters), rsLoRA, DoRA,
    and QLoRA where bitsandbytes is installed."""
    arm = ArmSpec.model_validate
    arms = [
        arm({"name": "full", "method": "full"}),
        arm({"name": "lora", "method": "lora", "rank": rank}),
        arm({"name": "lora-attn", "method": "lora", "targets": "attention", "match_params": "lora"}),
        arm({"name": "rslora", "method": "lora", "rank": rank, "rslora": True}),
        arm({"name": "dora", "method": "dora", "rank": rank}),
    ]
    if qlora_available():
        arms.append(arm({"name": "qlora", "method": "qlora", "rank": rank}))
    return arms


def rank_arms(model: str, tokens: int, rank_scaling: str) -> list[ArmSpec]:
    """The rank study: full and a LoRA at each rank of RANKS the model allows (every other one below a
    million tokens, always keeping 1 and the largest), scaled by rsLoRA's one alpha or by alpha = 2 x rank."""
    arm = ArmSpec.model_validate
    cap = min_linear_dim(model)
    ranks = [x for x in RANKS if x <= cap]
    if tokens < 1_000_000:  # small budgets: every other rank, always keeping 1 and the largest
        ranks = sorted({*ranks[::2], ranks[-1]})
    scaling = {"rslora": True, "alpha": rank_alpha(model)} if rank_scaling == "rslora" else {}
    return [arm({"name": "full", "method": "full"})] + [
        arm({"name": f"lora-r{x}", "method": "lora", "rank": x, "label": str(x), **scaling}) for x in ranks
    ]


def lr_arms(rank: int, base_lr: float, lr_grid: list[float] | None) -> list[ArmSpec]:
    """The LR study: full and LoRA swept at every seed over one grid (lr_grid, else LR_GRID, times base_lr)."""
    arm = ArmSpec.model_validate
    grid = [base_lr * f for f in (lr_grid or LR_GRID)]  # one grid: the ratio of optima can be anything
    every = {"lr_sweep": grid, "sweep_every_seed": True}
    return [
        arm({"name": "full", "method": "full", **every}),
        arm({"name": "lora", "method": "lora", "rank": rank, **every}),
    ]


def batch_arms(rank: int) -> list[ArmSpec]:
    """The batch study: full and LoRA each at batch 1, at the default batch, and at 4x accumulation."""
    out = []
    for method in ("full", "lora"):
        for b, accum, label in ((1, 1, "small"), (None, None, "default"), (None, 4, "large")):
            fields: dict[str, Any] = {"name": f"{method}-{label}", "method": method, "label": label}
            if method == "lora":
                fields["rank"] = rank
            if b is not None:
                fields["batch"] = b
            if accum is not None:
                fields["grad_accum"] = accum
            out.append(ArmSpec.model_validate(fields))
    return out


def targets_arms(rank: int) -> list[ArmSpec]:
    """The targets study: LoRA on every linear layer, and on attention or the MLP alone at the same
    trainable parameters."""
    arm = ArmSpec.model_validate
    return [
        arm({"name": "lora-all", "method": "lora", "rank": rank, "label": "all-linear"}),
        arm(
            {
                "name": "lora-attn",
                "method": "lora",
                "targets": "attention",
                "match_params": "lora-all",
                "label": "attention",
            }
        ),
        arm(
            {
                "name": "lora-mlp",
                "method": "lora",
                "targets": "mlp",
                "match_params": "lora-all",
                "label": "mlp",
            }
        ),
    ]


def data_size_arms(model: str) -> list[ArmSpec]:
    """The data-size study: full and LoRA at a low and a high rank, each on 1%, 10% and all of the data."""
    arm = ArmSpec.model_validate
    low, high = min(4, min_linear_dim(model)), min(64, min_linear_dim(model))
    out = []
    for frac in (0.01, 0.1, 1.0):
        pct = f"{100 * frac:g}pct"
        label = f"{100 * frac:g}%"
        out.append(arm({"name": f"full-{pct}", "method": "full", "data_fraction": frac, "label": label}))
        for rank in sorted({low, high}):
            out.append(
                arm(
                    {
                        "name": f"lora-r{rank}-{pct}",
                        "method": "lora",
                        "rank": rank,
                        "data_fraction": frac,
                        "label": label,
                    }
                )
            )
    return out


def resolve_ranks(spec: CompareSpec) -> tuple[list[ArmSpec], list[str]]:
    """Arms with match_params turned into a rank; notes saying what was matched."""
    by_name = {a.name: a for a in spec.arms}
    notes: list[str] = []
    out = []
    for a in spec.arms:
        if a.match_params is None:
            out.append(a)
            continue
        ref = by_name[a.match_params]
        if ref.match_params is not None:
            raise UserError(
                f"arm {a.name}: match_params points at {ref.name}, which itself matches another arm"
            )
        if not ref.is_lora:
            raise UserError(f"arm {a.name}: match_params must name a LoRA-family arm ({ref.name} is full)")
        want = lora_params(spec.model, ref.targets, ref.rank, ref.method == "dora")
        rank = matched_rank(spec.model, a.targets, want, a.method == "dora")
        shapes = _targeted_shapes(spec.model, a.targets)
        cap = min((min(s) for s in shapes.values()), default=rank)
        capped = rank > cap
        rank = min(rank, cap)  # a higher rank than a targeted Linear's dimension adds no capacity
        got = lora_params(spec.model, a.targets, rank, a.method == "dora")
        notes.append(
            f"arm {a.name}: rank {rank} on {_targets_text(a.targets)} gives {got:,} trainable params, "
            f"matched to {ref.name} ({want:,}, rank {ref.rank} on {_targets_text(ref.targets)})"
            + (f"; capped at {cap}, the smallest dimension of its targeted modules" if capped else "")
        )
        out.append(a.model_copy(update={"rank": rank, "match_params": None, "alpha": a.alpha}))
    for a in out:
        if a.is_lora:
            check_rank(a.rank, _targeted_shapes(spec.model, a.targets), flag=f"arm {a.name}: rank")
    return out, notes


def _targeted_shapes(model: str, targets: str | list[str]) -> dict[str, tuple[int, int]]:
    """(in, out) of the Linears a target preset or list selects, by full module path."""
    from adaptlab.methods import resolve_targets

    try:
        names = set(resolve_targets(_meta_model(model), targets))
    except UserError:
        return {}  # the arm's own run reports targets that match nothing, as a failed arm
    return {n: (i, o) for n, (o, i) in linear_shapes(model).items() if n.rsplit(".", 1)[-1] in names}


def _targets_text(t: str | list[str]) -> str:
    return t if isinstance(t, str) else ",".join(t)


@dataclass
class RunPlan:
    """One training run: an arm at one LR and one seed, written to OUT/runs/<run>."""

    run: str
    arm: str
    seed_index: int
    seed: int
    method_fields: dict[str, Any]
    train_fields: dict[str, Any]
    data_sources: list[str]
    lr: float | None  # None: the arm's LR sweep decides (filled in once the sweep has run)
    lr_source: str  # explicit | rule | sweep
    sweep: bool = False  # one point of an LR sweep (seed 0, or every seed with sweep_every_seed)
    init_from: str | None = None  # the run (same seed, same comparison) whose weights this run starts from
    notes: list[str] = field(default_factory=list)

    def run_config(self, spec: CompareSpec, out: str) -> dict[str, Any]:
        if self.lr is None:
            raise AssertionError(f"run {self.run}: LR not resolved")
        model: dict[str, Any] = {"name": spec.model}
        if self.init_from is not None:
            model["init_from"] = str(Path(out).parent / self.init_from)
        return {
            "model": model,
            "method": self.method_fields,
            "data": {
                "train": self.data_sources,
                "text_field": spec.data.text_field if self.data_sources == spec.data.train else "text",
                "val_frac": spec.data.val_frac,
                "test_frac": spec.data.test_frac,
            },
            "train": {**self.train_fields, "lr": self.lr, "seed": self.seed},
            "out": out,
        }


def lr_text(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-").replace("e+0", "e")


def default_lr(spec: CompareSpec, arm: ArmSpec) -> float:
    return spec.train.default_lr(arm.method)


def steps_for(tokens: int, tokens_per_step: int) -> int:
    return max(1, math.ceil(tokens / tokens_per_step))


def train_fields(spec: CompareSpec, arm: ArmSpec, tokens: int) -> dict[str, Any]:
    """The TrainSpec fields of the arm's runs: the comparison's StepSpec, the arm's batch, the budget."""
    t = spec.train
    step = t.model_dump(include=set(StepSpec.model_fields) - {"seed"})
    step["batch"] = arm.batch or t.batch
    step["grad_accum"] = arm.grad_accum or t.grad_accum
    if arm.sweep_every_seed:  # the best LR is picked on validation loss: not on a handful of blocks
        step["eval_examples"] = max(step["eval_examples"], LR_EVAL_BLOCKS)
    steps = steps_for(tokens, step["batch"] * step["grad_accum"] * t.seq_len)
    save_every = steps // (t.checkpoints + 1) if t.checkpoints else 0
    return {
        **step,
        "steps": steps,
        "eval_every": max(1, steps // t.eval_points) if t.eval_points > 1 else None,
        "save_every": save_every or None,
        "keep_checkpoints": 1,
    }


def method_fields(arm: ArmSpec) -> dict[str, Any]:
    return arm.method_spec().model_dump(mode="json", exclude_unset=not arm.is_lora)


def expand(
    spec: CompareSpec, arms: list[ArmSpec], data_for: dict[str, tuple[list[str], int]] | None = None
) -> list[RunPlan]:
    """Every run of the comparison. data_for maps an arm with data_fraction to (sources, tokens)."""
    plans: list[RunPlan] = []
    for a in arms:
        sources, tokens = (data_for or {}).get(a.name, (a.data or spec.data.train, a.tokens or spec.tokens))
        fields = train_fields(spec, a, tokens)
        for s in range(spec.seeds):
            seed = spec.train.seed + s
            suffix = f"-s{s}" if spec.seeds > 1 else ""
            common = {
                "init_from": a.init_from + suffix if a.init_from else None,
                "arm": a.name,
                "seed_index": s,
                "seed": seed,
                "method_fields": method_fields(a),
                "train_fields": fields,
                "data_sources": sources,
            }
            if a.lr_sweep is None:
                lr, source = (a.lr, "explicit") if a.lr is not None else (default_lr(spec, a), "rule")
                plans.append(RunPlan(run=a.name + suffix, lr=lr, lr_source=source, **common))
            elif s == 0 or a.sweep_every_seed:
                for lr in a.lr_sweep:
                    plans.append(
                        RunPlan(
                            run=f"{a.name}-lr{lr_text(lr)}{suffix}",
                            lr=lr,
                            lr_source="sweep",
                            sweep=True,
                            **common,
                        )
                    )
            else:
                plans.append(RunPlan(run=a.name + suffix, lr=None, lr_source="sweep", **common))
    if spec.train.compile == "auto":
        _one_compile_decision(spec.model, plans)
    return plans


def _one_compile_decision(model: str, plans: list[RunPlan]) -> None:
    """`compile: auto` weighs each run's method and length; in a comparison every run stays eager unless
    all would compile, so that no arm's speed is the compiler's and the others' not."""
    from adaptlab import compiling

    n_params = sum(p.numel() for p in _meta_model(model).parameters())

    def work(f: dict[str, Any]) -> float:
        return float(n_params) * f["steps"] * f["batch"] * f["grad_accum"] * f["seq_len"]

    if any(compiling.workload_blockers(p.method_fields["method"], work(p.train_fields)) for p in plans):
        for plan in plans:
            plan.train_fields["compile"] = False


BUDGETS = (("small", 0.25), ("large", 1.0))  # the regime study's two budgets, as fractions of --tokens
COMBINED = "lora-a+b"  # the continual study's A and B adapters combined into one


def _need(study: str, study_data: list[str]) -> None:
    from adaptlab.errors import UserError

    if not study_data:
        what = "the target domain as instruction pairs" if study == "regime" else "domain B"
        raise UserError(f"study {study} needs --study-data ({what})")


def regime_arms(rank: int, tokens: int, study_data: list[str]) -> list[ArmSpec]:
    """full and LoRA on raw text (cpt) and on instruction pairs (ift), each at two budgets."""
    _need("regime", study_data)
    arms = []
    for budget, frac in BUDGETS:
        for regime, data in (("cpt", None), ("ift", study_data)):
            for method in ("full", "lora"):
                fields: dict[str, Any] = {
                    "name": f"{regime}-{method}-{budget}",
                    "method": method,
                    "tokens": max(1, int(tokens * frac)),
                    "label": f"{regime} {budget}",
                }
                if method == "lora":
                    fields["rank"] = rank
                if data is not None:
                    fields["data"] = data
                arms.append(ArmSpec.model_validate(fields))
    return arms


def continual_arms(rank: int, tokens: int, study_data: list[str]) -> list[ArmSpec]:
    """A then B for full and LoRA, and a separate B adapter (for combining and swapping)."""
    _need("continual", study_data)
    arm = ArmSpec.model_validate
    return [
        arm({"name": "full-a", "method": "full", "label": "A"}),
        arm({"name": "lora-a", "method": "lora", "rank": rank, "label": "A"}),
        arm(
            {
                "name": "full-a-then-b",
                "method": "full",
                "data": study_data,
                "init_from": "full-a",
                "label": "A, B",
            }
        ),
        arm(
            {
                "name": "lora-a-then-b",
                "method": "lora",
                "rank": rank,
                "data": study_data,
                "init_from": "lora-a",
                "label": "A, B",
            }
        ),
        arm({"name": "lora-b", "method": "lora", "rank": rank, "data": study_data, "label": "B"}),
    ]
