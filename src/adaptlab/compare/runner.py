"""Run a comparison: train every arm in its own process, evaluate and analyse it, cache everything.

Each run is a normal run directory OUT/runs/<run>/ trained by `python -m adaptlab train` in a child
process, so peak memory is measured per arm and a crash of one arm leaves the others standing.
Progress is streamed from the child's metrics.jsonl. A finished run is skipped, an interrupted one
resumed (`--resume`), one whose resolved config changed is retrained; `force` retrains named arms.
Evaluation (OUT/runs/<run>/eval.json) and analysis (OUT/runs/<run>/analysis.json) are cached per
run under a key of their settings, so a second invocation recomputes nothing.

    python -c "from adaptlab.compare import compare; help(compare)"
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptlab import outputs
from adaptlab.compare.arms import (
    RunPlan,
    check_seq_len_fits,
    expand,
    resolve_ranks,
    study_arms,
)
from adaptlab.compare.child import Job, OnEvent, write_if_changed
from adaptlab.compare.evaluation import Probes, analyze_run, evaluate_run, load_probes, write_json
from adaptlab.compare.executors import Executor
from adaptlab.compare.spec import ArmSpec, CompareSpec
from adaptlab.compare.sweeps import add_lr_ratio, extend_sweeps, sweep_results
from adaptlab.errors import StudyRefused, UserError

DEFAULT_EPOCHS = 2.0


# ---------------------------------------------------------------------------------------------- data


def data_subsets(
    spec: CompareSpec, arms: list[ArmSpec], out: Path
) -> tuple[dict[str, tuple[list[str], int]], list[str]]:
    """Nested subsets of the training documents for arms with data_fraction: (sources, token budget).

    The pool ("100%") is the training documents in hash order, cut where `epochs` passes over it
    would exceed the budget; each fraction takes a prefix of the pool (so subsets are nested),
    keeps the validation and test documents (so every arm is measured on the same held-out text),
    and trains the same number of epochs over its own documents. Fractions that would select the same
    documents (a pool too small for them to differ) are refused: their arms would differ in name only.
    """
    sized = [a for a in arms if a.data_fraction is not None]
    if not sized:
        return {}, []
    from adaptlab.data.corpus import split_documents, split_fraction, tokenize_text
    from adaptlab.data.sources import load_documents
    from adaptlab.models import load_tokenizer

    d = spec.data
    docs = load_documents(d.train, d.text_field)
    held = [x for s in ("val", "test") for x in split_documents(docs, s, d.val_frac, d.test_frac)]  # type: ignore[arg-type]
    train = sorted(
        split_documents(docs, "train", d.val_frac, d.test_frac), key=lambda x: (split_fraction(x.id), x.id)
    )
    tok = load_tokenizer(spec.model)
    epochs = max(a.epochs or DEFAULT_EPOCHS for a in sized)
    limit = spec.tokens / epochs
    pool, pool_tokens, counts = [], 0, []
    for start in range(0, len(train), 64):
        chunk = train[start : start + 64]
        lengths = [len(ids) + 1 for ids in tokenize_text(chunk, tok)]  # +1: the EOS between documents
        for doc, n in zip(chunk, lengths, strict=True):
            if pool and pool_tokens + n > limit:
                break
            pool.append(doc)
            counts.append(n)
            pool_tokens += n
        else:
            continue
        break
    _check_distinct_subsets(spec, sized, len(pool))
    notes = [
        f"data-size: the 100% pool is {len(pool)} of {len(train)} training documents ({pool_tokens:,} tokens), "
        f"as many as {epochs:g} epochs fit in the budget of {spec.tokens:,} tokens; every arm trains "
        "the same number of epochs over its nested subset, so budgets differ by design"
    ]
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[list[str], int]] = {}
    for a in sized:
        frac = a.data_fraction or 1.0
        n_docs = subset_size(frac, len(pool))
        subset = pool[:n_docs]
        blocks = max(1, sum(counts[:n_docs]) // spec.train.seq_len)
        path = data_dir / f"subset-{frac:g}.jsonl"
        lines = []
        for doc in held + subset:
            rec: dict[str, Any] = {"id": doc.id}
            if doc.is_chat:
                rec["messages"] = list(doc.messages)
            else:
                rec["text"] = doc.text
            lines.append(json.dumps(rec, ensure_ascii=False))
        write_if_changed(path, "\n".join(lines) + "\n")
        tokens = math.ceil((a.epochs or epochs) * blocks * spec.train.seq_len)
        result[a.name] = ([str(path.resolve())], tokens)
    return result, notes


def subset_size(fraction: float, pool: int) -> int:
    """Documents of a pool of `pool` documents that a data fraction trains on (at least one)."""
    return max(1, round(fraction * pool))


def _check_distinct_subsets(spec: CompareSpec, sized: list[ArmSpec], pool: int) -> None:
    """Refuse fractions that select the same documents of the pool, naming them and what to raise."""
    by_size: dict[int, list[float]] = {}
    for frac in sorted({a.data_fraction or 1.0 for a in sized}):
        by_size.setdefault(subset_size(frac, pool), []).append(frac)
    same = next(((n, fr) for n, fr in sorted(by_size.items()) if len(fr) > 1), None)
    if same is None:
        return
    n, fracs = same
    names = [f"{100 * f:g}%" for f in fracs]
    listed = ", ".join(names[:-1]) + " and " + names[-1]
    raise StudyRefused(
        f"data-size: at --tokens {spec.tokens:,} the pool is {pool} training document(s), so fractions "
        f"{listed} train on the same {n} document(s); raise --tokens or give fewer fractions"
    )


# ------------------------------------------------------------------------------------------ the driver


def resolve_spec(spec: CompareSpec) -> CompareSpec:
    """The spec with a study's preset arms filled in (explicit arms win over the study's)."""
    if spec.arms or spec.study is None:
        return spec
    arms = study_arms(
        spec.study, spec.model, spec.tokens, spec.train.lr, spec.study_data, spec.rank_scaling, spec.lr_grid
    )
    return spec.model_copy(update={"arms": arms})


def compare(
    spec: CompareSpec,
    out: str | Path,
    force: Sequence[str] = (),
    on_event: OnEvent | None = None,
    report: bool = True,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Train, evaluate and analyse every arm; write OUT/results.json (and the report); return results.

    OUT is claimed and locked first (adaptlab.outputs): a folder holding files adaptlab did not write
    is refused unless `overwrite`, a second comparison on OUT is refused while this one runs, and
    `inputs` (the comparison's own --config file) are never written, even when they live in OUT.
    executor: where training runs execute (compare.executors: local, one or K at a time, or Ray tasks).
    """
    from adaptlab.compare.executors import LocalExecutor

    out = Path(out)
    with outputs.owned(out, "comparison", overwrite=overwrite, inputs=inputs):
        return _compare(
            spec,
            out,
            force,
            on_event or (lambda e: None),
            report,
            overwrite,
            inputs,
            executor or LocalExecutor(),
        )


def _compare(
    spec: CompareSpec,
    out: Path,
    force: Sequence[str],
    emit: OnEvent,
    report: bool,
    overwrite: bool,
    inputs: Sequence[str | Path],
    executor: Executor,
) -> dict[str, Any]:
    """compare() inside OUT's claim: plan every run, train, measure, then write results.json and the report."""
    from adaptlab.compare.results import assemble
    from adaptlab.compare.studies import study_results

    spec = resolve_spec(spec)
    arms, plans, notes = _plan(spec, out, force, overwrite, inputs)
    emit({"event": "plan", "runs": [p.run for p in plans], "arms": [a.name for a in arms], "notes": notes})
    status, sweeps = _train(spec, plans, force, out, emit, overwrite, executor)
    measured = _measure(spec, arms, plans, sweeps, status, out, emit)
    results = assemble(spec, arms, plans, status, sweeps, measured, out, notes)
    if spec.study == "lr":
        add_lr_ratio(results, arms, sweeps)
    if (table := study_results(spec, out, results, emit)) is not None:
        results[spec.study or "study"] = table
    write_json(out / "results.json", results)
    if report:
        from adaptlab.report.render import write_report

        results["report"] = {k: str(v) for k, v in write_report(results, out).items()}
        write_json(out / "results.json", results)
    return results


def _plan(
    spec: CompareSpec, out: Path, force: Sequence[str], overwrite: bool, inputs: Sequence[str | Path]
) -> tuple[list[ArmSpec], list[RunPlan], list[str]]:
    """The arms, every run they need and the notes on how they were sized, after the checks that must
    fail before any training: sequence length, the data file, --force names, each run's folder.
    Writes OUT/compare.yaml (the resolved spec) unless it is one of the comparison's inputs."""
    from adaptlab.data.sources import load_documents

    check_seq_len_fits(spec.model, spec.train.seq_len)
    load_documents(spec.data.train, spec.data.text_field)  # a malformed file: one line now, not one per arm
    spec_path = out / "compare.yaml"
    if not any(spec_path.resolve() == Path(p).resolve() for p in inputs):
        write_if_changed(spec_path, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    arms, notes = resolve_ranks(spec)
    data_for, data_notes = data_subsets(spec, arms, out)
    notes += data_notes
    plans = expand(spec, arms, data_for)
    known = {p.run for p in plans} | {a.name for a in arms}
    unknown = [f for f in force if f not in known]
    if unknown:
        raise UserError(f"--force {', '.join(unknown)}: no such arm; arms: {', '.join(a.name for a in arms)}")
    for p in plans:  # refuse before training anything, not after the first arms
        outputs.check_out(out / "runs" / p.run, "run", overwrite=overwrite)
    return arms, plans, notes


def _train(
    spec: CompareSpec,
    plans: list[RunPlan],
    force: Sequence[str],
    out: Path,
    emit: OnEvent,
    overwrite: bool,
    executor: Executor,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Train every run, in order: the runs with an LR of their own (LR sweeps included, extended past
    their grid's edge as needed: the extensions are added to `plans`), then the runs that take their
    sweep's best LR, then the runs that start from another run. Returns each run's status and the sweeps."""
    forced = {p.run for p in plans if p.run in force or p.arm in force}
    first = [p for p in plans if p.lr is not None and p.init_from is None]
    later = [p for p in plans if p.lr is None]
    chained = [p for p in plans if p.lr is not None and p.init_from is not None]  # after their sources
    status: dict[str, dict[str, Any]] = {}
    jobs = [Job(p, p.run in forced, i + 1, len(plans), overwrite) for i, p in enumerate(first)]
    status.update(executor.train_runs(jobs, spec, out, emit))
    sweeps = _train_sweep_extensions(spec, plans, status, force, out, emit, overwrite, executor)
    total = len(plans)
    jobs = _best_lr_jobs(later, sweeps, status, forced, total - len(later), total, overwrite)
    status.update(executor.train_runs(jobs, spec, out, emit))
    jobs = _chained_jobs(chained, status, forced, len(first) + len(later), total, out, overwrite)
    status.update(executor.train_runs(jobs, spec, out, emit))
    return status, sweeps


def _train_sweep_extensions(
    spec: CompareSpec,
    plans: list[RunPlan],
    status: dict[str, dict[str, Any]],
    force: Sequence[str],
    out: Path,
    emit: OnEvent,
    overwrite: bool,
    executor: Executor,
) -> dict[str, dict[str, Any]]:
    """Train one more LR past the edge of each sweep whose best LR lies on it, until none does (or each
    has had MAX_SWEEP_EXTENSIONS); the new runs are added to `plans`, their status to `status`.
    Returns the sweeps as they stand after the last extension."""
    sweeps = sweep_results(plans, status, out)
    extended: dict[str, int] = {}
    while extra := extend_sweeps(spec, plans, sweeps, extended):
        plans.extend(extra)
        total = len(plans)
        jobs = [
            Job(p, p.arm in force, total - len(extra) + i + 1, total, overwrite) for i, p in enumerate(extra)
        ]
        status.update(executor.train_runs(jobs, spec, out, emit))
        sweeps = sweep_results(plans, status, out)
    return sweeps


def _best_lr_jobs(
    later: list[RunPlan],
    sweeps: dict[str, dict[str, Any]],
    status: dict[str, dict[str, Any]],
    forced: set[str],
    done: int,
    total: int,
    overwrite: bool,
) -> list[Job]:
    """Jobs for the runs that take their arm's swept best LR (set on each plan here); a run whose sweep
    has no finished run is marked failed in `status` instead."""
    jobs = []
    for i, p in enumerate(later):
        best = sweeps.get(p.arm, {}).get("best_lr")
        if best is None:
            status[p.run] = {
                "status": "failed",
                "error": "every run of its LR sweep failed",
                "trained": False,
            }
            continue
        p.lr = best
        jobs.append(Job(p, p.run in forced, done + i + 1, total, overwrite))
    return jobs


def _chained_jobs(
    chained: list[RunPlan],
    status: dict[str, dict[str, Any]],
    forced: set[str],
    done: int,
    total: int,
    out: Path,
    overwrite: bool,
) -> list[Job]:
    """Jobs for the runs that start from another run, retrained when their start was retrained since;
    a run whose start failed is marked failed in `status` instead."""
    jobs = []
    for i, p in enumerate(chained):
        if status.get(p.init_from or "", {}).get("status") != "ok":
            status[p.run] = {
                "status": "failed",
                "error": f"{p.init_from}, its start, failed",
                "trained": False,
            }
            continue
        again = p.run in forced or _start_is_newer(out, p)  # its start retrained since: train it again
        jobs.append(Job(p, again, done + i + 1, total, overwrite))
    return jobs


def _measure(
    spec: CompareSpec,
    arms: list[ArmSpec],
    plans: list[RunPlan],
    sweeps: dict[str, dict[str, Any]],
    status: dict[str, dict[str, Any]],
    out: Path,
    emit: OnEvent,
) -> dict[str, dict[str, Any]]:
    """Evaluate and analyse the trained run of each seed that stands for each arm: run -> {"eval",
    "analysis", "own"?}. A run whose evaluation is refused (UserError) is marked failed in `status`."""
    probes: Probes | None = None
    measured: dict[str, dict[str, Any]] = {}
    for a in arms:
        for run in _representative_runs(a.name, plans, sweeps):
            if status.get(run, {}).get("status") != "ok":
                continue
            try:
                emit({"event": "eval_start", "run": run})
                if probes is None:
                    probes = load_probes(spec)
                measured[run] = _measure_run(spec, a, out / "runs" / run, probes, emit)
                emit({"event": "eval_done", "run": run})
            except UserError as err:
                status[run] = {"status": "failed", "error": f"evaluation: {err}", "trained": False}
                emit({"event": "eval_failed", "run": run, "error": str(err)})
    return measured


def _measure_run(
    spec: CompareSpec, arm: ArmSpec, run_dir: Path, probes: Probes, emit: OnEvent
) -> dict[str, Any]:
    """One run's evaluation, its weight analysis (when enabled) and, for an arm on data of its own,
    its evaluation on that data."""
    ev = evaluate_run(spec, run_dir, probes, emit)
    an = None
    if spec.analysis.enabled:
        emit({"event": "analysis_start", "run": run_dir.name})
        an = analyze_run(spec, run_dir)
    measured: dict[str, Any] = {"eval": ev, "analysis": an}
    if arm.data is not None:  # an arm on data of its own is measured on it too
        from adaptlab.compare.studies import evaluate_own

        measured["own"] = evaluate_own(spec, run_dir, arm.data, emit)
    return measured


def _start_is_newer(out: Path, plan: RunPlan) -> bool:
    """Whether the run `plan` starts from finished after `plan`'s own run did."""
    own, start = (out / "runs" / r / "summary.json" for r in (plan.run, plan.init_from or ""))
    return own.exists() and start.exists() and start.stat().st_mtime_ns > own.stat().st_mtime_ns


def _representative_runs(arm: str, plans: list[RunPlan], sweeps: dict[str, dict[str, Any]]) -> list[str]:
    """The run of each seed that stands for the arm (for an LR sweep: the best LR's run at each seed that
    swept)."""
    out = []
    for p in plans:
        if p.arm != arm:
            continue
        if p.sweep:
            if p.lr == sweeps.get(arm, {}).get("best_lr"):
                out.append(p.run)
        else:
            out.append(p.run)
    return out
