"""`adaptlab decide`: LoRA or full fine-tuning for my model, my data and my hardware, in the time I have.

adaptlab decide --model smollm2-135m --data python-stdlib --time 20m --out runs/decision
adaptlab decide --model M --data D --time 2h --target-tokens 50M --gpus 8 --device cuda --memory 80GiB --dry-run
"""

from __future__ import annotations

from typing import Any

import click

from adaptlab.cli.options import executor_options, overwrite_option
from adaptlab.errors import UserError


def _methods(ctx: Any, param: Any, value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


def _duration(s: float) -> str:
    from adaptlab.decide.design import fmt_s

    return fmt_s(s)


def _print_design(d: dict[str, Any], target: dict[str, Any], costs: Any) -> None:
    click.echo(f"target: {target['where']}")
    for m, t in target["methods"].items():
        mem = f"{t['peak_mem_bytes'] / 2**30:.2f} GiB" if t.get("peak_mem_bytes") else "n/a"
        click.echo(f"  {m:6s} {'fits' if t['fits'] else 'does not fit'} ({mem})")
    for n in target["notes"]:
        click.echo(f"  note: {n}")
    click.echo(
        f"experiment: {', '.join(d['methods'])}; LR candidates per method {len(d['lrs'][d['methods'][0]])} "
        f"(successive halving, reduction factor {d['reduction_factor']}); pilot budgets "
        f"{', '.join(f'{b:,}' for b in d['budgets'])} tokens ({', '.join(map(str, d['steps']))} steps); "
        f"{d['seeds']} seed(s); {d['eval_docs']} held-out documents per probe"
    )
    for m, lrs in d["lrs"].items():
        click.echo(f"  {m:6s} LRs {', '.join(f'{x:.2g}' for x in lrs)}")
    parts = ", ".join(f"{k} {_duration(v)}" for k, v in d["breakdown"].items())
    source = f" ({costs.source})" if costs is not None else " (the stored design of this --out)"
    click.echo(
        f"{d['runs']} training runs, {d['evaluations']} evaluations; estimated {_duration(d['estimate_s'])} "
        f"({d['estimate_s']:.0f} s)"
        f"{source}: {parts}"
    )
    for n in d["notes"]:
        click.echo(f"  note: {n}")


class DecisionPrinter:
    """The comparison's per-run lines plus the decision's phases and its whole ETA."""

    def __init__(self) -> None:
        from adaptlab.cli.compare import Printer

        self.runs = Printer()

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e["event"]
        if kind == "phase":
            self.runs.echo(f"decide: {e['text']}")
        elif kind == "decision_progress":
            self.runs.echo(
                f"decide: {e['runs_done']}/{e['runs']} runs, {e['evaluations_done']}/{e['evaluations']} "
                f"evaluations; about {_duration(e['eta_s'])} left"
            )
        elif kind != "design":
            self.runs(e)


@click.command("decide")
@click.option(
    "--model", required=True, help="Base model: smollm2-135m, tiny-random, a local HF dir or a hub id."
)
@click.option(
    "--data", multiple=True, required=True, help="Target-domain data (file, dir, glob, python-stdlib)."
)
@click.option(
    "--general",
    multiple=True,
    help="General-domain text: forgetting as its NLL increase (default: drift KL).",
)
@click.option(
    "--time", "time_text", required=True, help="Wall time the whole decision may take here, e.g. 20m, 2h."
)
@click.option(
    "--target-tokens", help="The budget you will train at, e.g. 50M: the pilot is extrapolated to it."
)
@click.option(
    "--memory",
    help="Memory per device of the hardware you will train on, e.g. 80GiB (default: this machine's).",
)
@click.option(
    "--gpus", type=int, default=1, show_default=True, help="Devices you will train on (with --memory)."
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    help="Device type you will train on (default: this machine's).",
)
@click.option(
    "--methods",
    default="full,lora",
    show_default=True,
    callback=_methods,
    help="Methods to decide between: full, lora, dora, qlora.",
)
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA-family rank.")
@click.option("--targets", default="all-linear", show_default=True, help="LoRA-family target modules.")
@click.option("--batch", type=int, default=4, show_default=True, help="Pilot sequences per step.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Pilot tokens per sequence.")
@click.option("--lr-candidates", type=int, help="LRs searched per method (default: 2-4, as --time allows).")
@click.option("--seeds", type=int, help="Replicates of each winner (default: 1-3, as --time allows).")
@click.option("--budgets", type=int, help="Pilot budgets (default: 2-3, as --time allows).")
@click.option(
    "--eval-docs", type=int, default=32, show_default=True, help="Held-out documents scored per probe."
)
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option(
    "--out", default="adaptlab-decision", show_default=True, type=click.Path(), help="Output directory."
)
@click.option(
    "--no-calibration",
    is_flag=True,
    help="Estimate from the planner's time model alone, and record nothing for later estimates.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the experiment and its estimated wall time; train nothing."
)
@overwrite_option
@executor_options
def decide_command(
    time_text: str,
    target_tokens: str | None,
    out: str,
    dry_run: bool,
    no_calibration: bool,
    overwrite: bool,
    executor: str,
    parallel_runs: int,
    ray_address: str | None,
    gpus_per_run: float,
    cpus_per_run: float,
    **flags: Any,
) -> None:
    """Train full fine-tuning and the LoRA family in a pilot sized to --time; answer which to use."""
    from pathlib import Path

    from pydantic import ValidationError

    from adaptlab.compare.executors import make_executor
    from adaptlab.decide import DecideSpec, decide, prepare
    from adaptlab.decide.spec import parse_duration, parse_tokens
    from adaptlab.models import quiet_transformers

    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v is not None}
    fields["time_s"] = parse_duration(time_text)
    if target_tokens is not None:
        fields["target_tokens"] = parse_tokens(target_tokens)
    try:
        spec = DecideSpec(**fields)
    except ValidationError as err:
        e = err.errors()[0]
        where = "--" + str(e["loc"][0]).replace("_", "-") if e["loc"] else "decide"
        raise UserError(f"{where}: {e['msg']}") from None
    quiet_transformers()
    if dry_run:
        target, design, costs = prepare(spec, Path(out), executor, parallel_runs, not no_calibration)
        _print_design(design.as_dict(), target.as_dict(), costs)
        return
    runner = make_executor(executor, parallel_runs, ray_address, gpus_per_run, cpus_per_run)
    from adaptlab.cli.compare import stop_on_sigterm

    printer = DecisionPrinter()
    with stop_on_sigterm():
        decision = decide(
            spec,
            out,
            executor=runner,
            on_event=printer,
            overwrite=overwrite,
            executor_kind=executor,
            parallel=parallel_runs,
            calibrate=not no_calibration,
        )
    click.echo((Path(out) / "decision.md").read_text())
    click.echo(f"decision: {out}/decision.json, {out}/decision.md; every run: {out}/compare/")
    if decision["pick"] is None:
        raise click.ClickException(decision["reason"])
