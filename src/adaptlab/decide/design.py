"""The experiment a decision runs, sized to the time it may take, from the planner's time model.

A decision trains, per method, an LR search by successive halving whose rungs are the pilot budgets
(B, r x B, r^2 x B tokens for reduction factor r), then replicates each method's winner at every
pilot budget over `seeds` seeds and evaluates those runs (learning and forgetting). Its cost on this
machine is modelled run by run:

    run      = start (process, model load, save) + steps x step time + validation passes
    evaluate = model load + scored tokens x forward time per token          (each replicated run)
    total    = setup + training / runs at once + the base's evaluation + every run's evaluation

Step times are the planner's (plan.planner.plan on this machine: FLOPs and traffic at measured device
rates). The rest are constants below, scaled by what earlier decisions on this machine measured
(calibration.json in the plan cache: measured / estimated per phase). `size` picks the richest
design (LR candidates, seeds, budgets, in PREFERENCES' order) whose smallest rung still trains
MIN_RUNG_STEPS steps and whose top rung MIN_TOP_STEPS, and gives its first rung every second left.

    python -c "from adaptlab.decide.design import PREFERENCES; print(PREFERENCES)"
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from adaptlab.decide.search import prior_first, survivors
from adaptlab.decide.spec import DecideSpec
from adaptlab.errors import UserError

PREFERENCES: list[tuple[int, int, int]] = [
    (4, 3, 3),
    (4, 3, 2),
    (3, 3, 2),
    (3, 2, 2),
    (2, 2, 2),
    (3, 1, 2),
    (2, 1, 2),
]
"""(LR candidates, seeds, pilot budgets), most informative first. Two budgets at least: the
extrapolation to the target budget needs them."""
MIN_RUNG_STEPS = 4
MIN_TOP_STEPS = 24
LR_SPACING = math.sqrt(10.0)
"""Candidates are the method's default LR times powers of sqrt(10): the same relative grid for every
method, so the ratio of their optima is measured, not assumed."""
LR_OFFSETS = {2: (0, 1), 3: (-1, 0, 1), 4: (-1, 0, 1, 2), 5: (-2, -1, 0, 1, 2), 6: (-2, -1, 0, 1, 2, 3)}
LR_OFFSETS.update({7: (-3, -2, -1, 0, 1, 2, 3), 8: (-3, -2, -1, 0, 1, 2, 3, 4)})

# the cost of a run besides its steps, and of an evaluation (seconds; scaled by the calibration)
CHILD_START_S = 7.0
"""A training run in its own process: Python, torch and transformers imported, the run set up."""
LOAD_BYTES_PER_S = 400e6
SAVE_BYTES_PER_S = 300e6
VAL_POINTS = 2
VAL_BLOCKS = 32
EVAL_MAX_CHARS = 2500
CHARS_PER_TOKEN = 3.5
DRIFT_PROMPTS = 16
DRIFT_TOKENS = 48
EVAL_OVERHEAD = 1.6
"""Scoring runs below training's forward rate (padding, small batches, per-document bookkeeping)."""
REPORT_S = 8.0


@dataclass
class Costs:
    """Seconds on this machine, per method where it differs."""

    step_s: dict[str, float]
    start_s: dict[str, float]
    val_s: float
    eval_s: dict[str, float]
    base_eval_s: float
    setup_s: float
    parallel: int = 1
    calibration: dict[str, float] = field(default_factory=lambda: {"train": 1.0, "eval": 1.0})
    source: str = "the planner's time model"


@dataclass
class Design:
    """The experiment: candidates, budgets, seeds, and what it is expected to take."""

    methods: list[str]
    lrs: dict[str, list[float]]
    budgets: list[int]
    steps: list[int]
    seeds: int
    reduction_factor: int
    eval_docs: int
    estimate_s: float
    breakdown: dict[str, float]
    runs: int
    evaluations: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Design:
        return cls(**d)


def lr_candidates(spec: DecideSpec, method: str, k: int) -> list[float]:
    """k LRs around the method's default (prior first): default x sqrt(10)^offset."""
    from adaptlab.config import default_lr

    prior = default_lr(method)
    grid = [float(f"{prior * LR_SPACING**o:.3g}") for o in LR_OFFSETS[k]]
    return prior_first(grid, prior)


def run_s(costs: Costs, method: str, steps: int) -> float:
    """One training run's seconds (before calibration)."""
    return costs.start_s[method] + steps * costs.step_s[method] + VAL_POINTS * costs.val_s


def estimate(
    costs: Costs, methods: list[str], k: int, seeds: int, steps: list[int], eta: int
) -> tuple[dict[str, float], int, int]:
    """(seconds per phase, training runs, evaluations) of a design."""
    search = replicate = evaluation = 0.0
    runs = evals = 0
    for m in methods:
        alive = k
        for s in steps:
            search += alive * run_s(costs, m, s)
            runs += alive
            alive = survivors(alive, eta)
        replicate += (seeds - 1) * sum(run_s(costs, m, s) for s in steps)
        runs += (seeds - 1) * len(steps)
        evaluation += seeds * len(steps) * costs.eval_s[m]
        evals += seeds * len(steps)
    cal = costs.calibration
    phases = {
        "setup": costs.setup_s,
        "search": cal["train"] * search / costs.parallel,
        "replicate": cal["train"] * replicate / costs.parallel,
        "evaluation": cal["eval"] * (evaluation + costs.base_eval_s),
        "report": REPORT_S,
    }
    return phases, runs, evals


def _options(spec: DecideSpec) -> list[tuple[int, int, int]]:
    """PREFERENCES with the user's fixed choices put in (duplicates dropped)."""
    out = []
    for k, s, r in PREFERENCES:
        opt = (spec.lr_candidates or k, spec.seeds or s, spec.budgets or r)
        if opt not in out:
            out.append(opt)
    return out


def size(spec: DecideSpec, methods: list[str], costs: Costs) -> Design:
    """The richest design that fits spec.time_s (see the module docstring); a UserError when even the
    smallest does not."""
    eta = spec.reduction_factor
    per_step = spec.batch * spec.seq_len
    best: tuple[int, int, int, int] | None = None
    for k, seeds, n_budgets in _options(spec):
        mult = [eta**i for i in range(n_budgets)]
        fixed, _, _ = estimate(costs, methods, k, seeds, [0] * n_budgets, eta)
        unit, _, _ = estimate(costs, methods, k, seeds, mult, eta)  # seconds of one rung-0 step, and fixed
        slope = sum(unit.values()) - sum(fixed.values())
        s0 = math.floor((spec.time_s - sum(fixed.values())) / slope) if slope > 0 else 0
        if spec.target_tokens is not None:  # no pilot beyond the budget the user will train at
            s0 = min(s0, max(1, spec.target_tokens // (per_step * mult[-1])))
        if s0 >= MIN_RUNG_STEPS and s0 * mult[-1] >= MIN_TOP_STEPS:
            best = (k, seeds, n_budgets, s0)
            break
        if s0 >= 2 and (best is None or s0 > best[3]):
            best = (k, seeds, n_budgets, s0)
    if best is None:
        k, seeds, n_budgets = _options(spec)[-1]
        fixed, _, _ = estimate(costs, methods, k, seeds, [2 * eta**i for i in range(n_budgets)], eta)
        raise UserError(
            f"--time {_fmt_s(spec.time_s)} is too short to decide on {spec.model} here: the smallest "
            f"decision ({k} LRs, {seeds} seed, {n_budgets} budgets of a few steps) needs about "
            f"{_fmt_s(sum(fixed.values()))}; give more --time, or --executor ray to spread it"
        )
    k, seeds, n_budgets, s0 = best
    steps = [s0 * eta**i for i in range(n_budgets)]
    phases, runs, evals = estimate(costs, methods, k, seeds, steps, eta)
    notes = []
    if seeds == 1:
        notes.append("one seed fits in --time: the verdicts are unreplicated (intervals over documents only)")
    if s0 * eta ** (n_budgets - 1) < MIN_TOP_STEPS:
        notes.append(
            f"the largest pilot budget is {steps[-1]} optimizer steps: a short pilot; more --time buys longer ones"
        )
    return Design(
        methods=methods,
        lrs={m: lr_candidates(spec, m, k) for m in methods},
        budgets=[s * per_step for s in steps],
        steps=steps,
        seeds=seeds,
        reduction_factor=eta,
        eval_docs=spec.eval_docs,
        estimate_s=sum(phases.values()),
        breakdown=phases,
        runs=runs,
        evaluations=evals + 1,
        notes=notes,
    )


def _fmt_s(s: float) -> str:
    if s >= 5400:
        return f"{s / 3600:.1f} h"
    if s >= 90:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


fmt_s = _fmt_s


# ------------------------------------------------------------------------------------- the time model


def local_costs(
    spec: DecideSpec,
    local_plan: dict[str, Any],
    methods: list[str],
    setup_s: float,
    executor: str,
    parallel: int,
    calibrate: bool = True,
) -> Costs:
    """Costs on this machine from its plan (plan.planner.plan at the pilot's batch and seq_len)."""
    per_step = spec.batch * spec.seq_len
    entries = local_plan["methods"]
    step_s = {m: float(entries[m]["step_s"]) for m in methods}
    fwd_token_s = step_s.get("full", max(step_s.values())) / per_step / 3.0
    weights = float(local_plan["architecture"].get("stored_bytes") or entries["full"]["artifact_bytes"])
    load_s = weights / LOAD_BYTES_PER_S
    start = CHILD_START_S if executor != "inline" else 1.0
    start_s = {m: start + load_s + entries[m]["artifact_bytes"] / SAVE_BYTES_PER_S for m in methods}
    data = local_plan["data"]
    doc_tokens = min(EVAL_MAX_CHARS / CHARS_PER_TOKEN, data["tokens"] / max(1, data["documents"]))
    probes = 2 if spec.general else 1
    scored = spec.eval_docs * doc_tokens * probes + (0 if spec.general else DRIFT_PROMPTS * DRIFT_TOKENS * 2)
    eval_s = {m: load_s + EVAL_OVERHEAD * scored * fwd_token_s for m in methods}
    generate = (
        0.0 if spec.general else DRIFT_TOKENS * DRIFT_PROMPTS * fwd_token_s * 8.0
    )  # one token a row at a time
    cal = calibration(spec.model) if calibrate else {}
    return Costs(
        step_s=step_s,
        start_s=start_s,
        val_s=VAL_BLOCKS * spec.seq_len * fwd_token_s * EVAL_OVERHEAD,
        eval_s=eval_s,
        base_eval_s=load_s + EVAL_OVERHEAD * scored * fwd_token_s + generate,
        setup_s=setup_s,
        parallel=max(1, parallel),
        calibration={k: cal.get(k, 1.0) for k in ("train", "eval")},
        source="the planner's time model"
        + (f", calibrated by {cal['decisions']} earlier decision(s) here" if cal.get("decisions") else ""),
    )


def _calibration_path() -> Any:
    from adaptlab.plan.measure import plan_cache

    return plan_cache() / "decide_calibration.json"


def _calibration_key(model: str) -> str:
    from adaptlab.plan.measure import cpu_name

    return f"{model}|{cpu_name()}"


def calibration(model: str) -> dict[str, Any]:
    """measured / estimated per phase from earlier decisions of this model on this machine."""
    try:
        return json.loads(_calibration_path().read_text()).get(_calibration_key(model), {})
    except (OSError, ValueError):
        return {}


def record_calibration(model: str, measured: dict[str, float], estimated: dict[str, float]) -> None:
    """Fold one decision's measured / estimated training and evaluation time into the calibration
    (the mean over decisions, so one slow afternoon does not decide the next estimate alone)."""
    path = _calibration_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    key = _calibration_key(model)
    old = table.get(key, {})
    n = int(old.get("decisions", 0))
    new: dict[str, Any] = {"decisions": n + 1}
    for phase in ("train", "eval"):
        if estimated.get(phase, 0) > 0 and measured.get(phase, 0) > 0:
            prior = old.get(phase, 1.0)
            ratio = measured[phase] / estimated[phase] * prior  # estimated already carried the prior factor
            new[phase] = (prior * n + ratio) / (n + 1)
        elif phase in old:
            new[phase] = old[phase]
    table[key] = new
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)


def seeds_within(design: Design, time_left_s: float, pace: float) -> int:
    """Seeds the replication can afford in time_left_s, with the rest of the design's estimate scaled by
    `pace` (measured / estimated so far): design.seeds, or fewer down to 2 (from 2 seeds on, the
    search's runs are the first seed's, so reducing keeps them)."""
    b = design.breakdown
    if design.seeds <= 2:
        return design.seeds
    for s in range(design.seeds, 2, -1):
        rest = (
            b["replicate"] * (s - 1) / (design.seeds - 1) + b["evaluation"] * s / design.seeds + b["report"]
        )
        if rest * pace <= time_left_s:
            return s
    return 2
