"""`adaptlab decide`: plan what fits the target hardware, size the experiment to --time, search each
method's LR by successive halving, replicate the winners over seeds at every pilot budget, and answer.

OUT holds decide.yaml (the settings), design.json (the sized experiment: a second invocation with the
same settings reuses it, so it resumes rather than redesigns), compare/ (an ordinary comparison
directory: every training run under compare/runs/, the replicated comparison's results.json and
report), decision.json and decision.md. A finished run is never trained again: an interrupted decision
started again replays the search from the runs' validation losses and trains only what is missing.

    python -c "from adaptlab.decide import decide; help(decide)"
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import yaml

from adaptlab import outputs
from adaptlab.compare.arms import lr_text
from adaptlab.compare.child import OnEvent, write_if_changed
from adaptlab.compare.executors import Executor, Job
from adaptlab.decide import design as sizing
from adaptlab.decide.design import Costs, Design
from adaptlab.decide.progress import Progress
from adaptlab.decide.search import Search, successive_halving
from adaptlab.decide.spec import DecideSpec
from adaptlab.decide.target import Target, target_hardware
from adaptlab.errors import UserError

EVAL_SEQ_LEN = 256


def arm_name(method: str, lr: float, rung: int) -> str:
    """One arm per method, LR and pilot budget; the arms of a method at one LR share the prefix the
    budget extrapolation names their family by (report.extrapolate)."""
    return f"{method}-lr{lr_text(lr)}.{rung}"


def arm_entry(spec: DecideSpec, design: Design, method: str, lr: float, rung: int) -> dict[str, Any]:
    arm: dict[str, Any] = {
        "name": arm_name(method, lr, rung),
        "method": method,
        "lr": lr,
        "tokens": design.budgets[rung],
        "label": f"{design.budgets[rung]:,} tokens",
    }
    if method != "full":
        arm.update(rank=spec.rank, targets=spec.targets)
    return arm


def compare_data(spec: DecideSpec, design: Design, seeds: int, arms: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparison every run of the decision belongs to (one spec: the same data order, the same
    validation blocks and the same evaluation for every arm)."""
    return {
        "model": spec.model,
        "data": {"train": list(spec.data), "text_field": spec.text_field},
        "general": list(spec.general),
        "drift": not spec.general,
        "tokens": design.budgets[-1],
        "seeds": seeds,
        "target_tokens": spec.target_tokens,
        "train": {
            "batch": spec.batch,
            "seq_len": spec.seq_len,
            "seed": spec.seed,
            "eval_points": sizing.VAL_POINTS,
            "eval_examples": sizing.VAL_BLOCKS,
            "checkpoints": 1,
        },
        "eval": {
            "max_docs": design.eval_docs,
            "max_chars": sizing.EVAL_MAX_CHARS,
            "seq_len": EVAL_SEQ_LEN,
            "drift_prompts": sizing.DRIFT_PROMPTS,
            "drift_tokens": sizing.DRIFT_TOKENS,
            "target_kl": False,
        },
        "analysis": {"enabled": False},
        "arms": arms,
    }


def prepare(
    spec: DecideSpec,
    out: Path | None,
    executor_kind: str = "local",
    parallel: int = 1,
    calibrate: bool = True,
) -> tuple[Target, Design, Costs | None]:
    """What fits the target, and the design: the one stored in OUT when its settings are these, else
    sized now from this machine's time model."""
    from adaptlab.compare.arms import check_seq_len_fits
    from adaptlab.data.sources import load_documents
    from adaptlab.plan import plan

    t0 = time.monotonic()
    check_seq_len_fits(spec.model, max(spec.seq_len, EVAL_SEQ_LEN))
    load_documents(spec.data, spec.text_field)  # a malformed file: one line now
    local = plan(
        spec.model,
        spec.data,
        seq_len=spec.seq_len,
        batch=spec.batch,
        ranks=[spec.rank],
        targets=spec.targets,
        text_field=spec.text_field,
    )
    target = target_hardware(spec, local)
    methods = [m for m in spec.methods if target.fits(m)]
    if not methods:
        raise UserError(f"no method fits the target hardware ({target.where}): {'; '.join(target.notes)}")
    stored = _stored_design(spec, out)
    if stored is not None:
        return target, stored, None
    costs = sizing.local_costs(
        spec, local, methods, time.monotonic() - t0, executor_kind, parallel, calibrate
    )
    return target, sizing.size(spec, methods, costs), costs


def _stored_design(spec: DecideSpec, out: Path | None) -> Design | None:
    if out is None or not (out / "design.json").exists() or not (out / "decide.yaml").exists():
        return None
    try:
        same = yaml.safe_load((out / "decide.yaml").read_text()) == spec.model_dump(mode="json")
        return Design.from_dict(_read_json(out / "design.json")) if same else None
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return None


def _read_json(path: Path) -> Any:
    import json

    return json.loads(path.read_text())


def decide(
    spec: DecideSpec,
    out: str | Path,
    executor: Executor | None = None,
    on_event: OnEvent | None = None,
    overwrite: bool = False,
    executor_kind: str = "local",
    parallel: int = 1,
    calibrate: bool = True,
) -> dict[str, Any]:
    """Run the decision into OUT and return decision.json's content (see the module docstring)."""
    from adaptlab.compare.executors import LocalExecutor

    out = Path(out)
    outputs.check_out(out, "decision", overwrite=overwrite)
    t0 = time.monotonic()
    target, design, costs = prepare(spec, out, executor_kind, parallel, calibrate)
    costs = costs if calibrate else None  # None: record no calibration
    emit = on_event or (lambda e: None)
    with outputs.owned(out, "decision", overwrite=overwrite):
        write_if_changed(out / "decide.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        from adaptlab.compare.evaluation import write_json

        write_json(out / "design.json", design.as_dict())
        progress = Progress(design, emit, t0)
        emit({"event": "design", "design": design.as_dict(), "target": target.as_dict()})
        return _run(spec, out, design, target, executor or LocalExecutor(), progress, overwrite, costs, t0)


def _search(
    spec: DecideSpec, design: Design, cmp_out: Path, executor: Executor, progress: Progress, overwrite: bool
) -> dict[str, Search]:
    """Each method's LR search: every rung's runs trained through the executor as seed 0 of the
    comparison the replication completes (the same run names and configs, so they are reused)."""
    from adaptlab.compare import build_spec
    from adaptlab.compare.arms import expand
    from adaptlab.rundir import RunDir

    def train_rung(method: str) -> Any:
        def run(alive: list[float], rung: int) -> dict[float, float | None]:
            arms = [arm_entry(spec, design, method, lr, rung) for lr in alive]
            cspec = build_spec(compare_data(spec, design, design.seeds, arms), source="decide")
            plans = {p.lr: p for p in expand(cspec, list(cspec.arms)) if p.seed_index == 0}
            jobs = [Job(p, False, i + 1, len(plans), overwrite) for i, p in enumerate(plans.values())]
            status = executor.train_runs(jobs, cspec, cmp_out, progress)
            losses: dict[float, float | None] = {}
            for lr in alive:
                name = plans[lr].run
                ok = status.get(name, {}).get("status") == "ok"
                losses[lr] = (RunDir(cmp_out / "runs" / name).read_summary() if ok else {}).get(
                    "final_val_loss"
                )
            return losses

        return run

    searches = {}
    for m in design.methods:
        progress.phase(f"LR search, {m}: {len(design.lrs[m])} candidates over {len(design.budgets)} budgets")
        searches[m] = successive_halving(
            design.lrs[m], len(design.budgets), train_rung(m), design.reduction_factor
        )
    return searches


def _fit_seeds(spec: DecideSpec, design: Design, search_s: float, t0: float) -> Design:
    """The design with fewer seeds when the search ran slower than estimated (never below 2)."""
    pace = min(3.0, max(0.5, search_s / max(design.breakdown["search"], 1e-9)))
    seeds = sizing.seeds_within(design, spec.time_s - (time.monotonic() - t0), pace)
    if seeds >= design.seeds:
        return design
    note = f"the search ran {pace:.1f}x its estimate: {seeds} seeds instead of {design.seeds}, to end within --time"
    return dataclasses.replace(design, seeds=seeds, notes=[*design.notes, note])


def _run(
    spec: DecideSpec,
    out: Path,
    design: Design,
    target: Target,
    executor: Executor,
    progress: Progress,
    overwrite: bool,
    costs: Costs | None,
    t0: float,
) -> dict[str, Any]:
    from adaptlab.compare import build_spec, compare
    from adaptlab.compare.evaluation import write_json
    from adaptlab.decide.answer import answer, render

    cmp_out = out / "compare"
    outputs.claim(cmp_out, "comparison", overwrite=overwrite)
    t_search = time.monotonic()
    searches = _search(spec, design, cmp_out, executor, progress, overwrite)
    search_s = time.monotonic() - t_search
    winners = {m: s.best for m, s in searches.items() if s.best is not None}
    if not winners:
        raise UserError("every run of the LR search failed: see the logs under " + str(cmp_out / "runs"))
    budgets = range(len(design.budgets))
    arms = [arm_entry(spec, design, m, lr, k) for m, lr in winners.items() for k in budgets]
    if not progress.reused:  # a search slower than estimated: fewer seeds rather than past --time
        design = _fit_seeds(spec, design, search_s, t0)
    progress.phase(
        f"replicating the winners over {design.seeds} seed(s) at {len(budgets)} budgets, then evaluating"
    )
    t_cmp = time.monotonic()
    cspec = build_spec(compare_data(spec, design, design.seeds, arms), source="decide")
    results = compare(cspec, cmp_out, on_event=progress, overwrite=overwrite, executor=executor)
    compare_s = time.monotonic() - t_cmp
    decision = answer(spec, design, target, searches, results)
    decision["wall_s"] = time.monotonic() - t0
    decision["estimate_s"] = design.estimate_s
    write_json(out / "decision.json", decision)
    (out / "decision.md").write_text(render(decision))
    if costs is not None and not progress.reused:  # a whole decision measured from scratch: calibrate
        b = design.breakdown
        measured_eval = max(0.0, compare_s - b["replicate"] * search_s / max(b["search"], 1e-9))
        sizing.record_calibration(
            spec.model,
            {"train": search_s, "eval": measured_eval},
            {"train": b["search"], "eval": b["evaluation"]},
        )
    return decision
