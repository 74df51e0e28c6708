"""Click options that several commands share, declared once so their names and help read the same.

@overwrite_option
@report_to_option("metrics", kind_uri="KIND=URI for a location")
@push_to_hub_option("the finished run's adapter/model")
def train_command(..., overwrite: bool, report_to: tuple[str, ...], push_to_hub: str | None): ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def report_to_option(what: str, kind_uri: str = "KIND=URI") -> Callable[[F], F]:
    """`--report-to`: the experiment trackers that also receive `what` (parsed by tracking.parse_report_to)."""
    return click.option(
        "--report-to",
        multiple=True,
        help=f"Also send {what} to tensorboard | mlflow | wandb (comma list or repeat; {kind_uri}).",
    )


def push_to_hub_option(what: str) -> Callable[[F], F]:
    """`--push-to-hub`: the hub repo that receives `what` with a model card (checked by publish.check_push)."""
    return click.option("--push-to-hub", help=f"Upload {what} with a model card to this hub repo.")


overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Write into an existing --out: replace adaptlab's earlier outputs, or write beside your files "
    "(never over one).",
)
"""`--overwrite`: write into a directory adaptlab marked, or beside a user's files (outputs.check_out)."""


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A float option's callback: nan and +-inf are refused in one line naming the option."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter("must be a finite number", ctx=ctx, param=param)
    return value


def executor_options(f: F) -> F:
    """`--executor`, `--parallel-runs`, `--ray-address`, `--gpus-per-run`, `--cpus-per-run`: where the
    training runs of a comparison (or a decision) execute (compare.executors.make_executor)."""
    options = [
        click.option(
            "--executor",
            type=click.Choice(["local", "ray", "inline"]),
            default="local",
            show_default=True,
            help="Where training runs execute: child processes on this machine, Ray tasks on a cluster, or "
            "inline (this process, one after another: for tiny models and smoke runs; memory figures are not "
            "per run).",
        ),
        click.option(
            "--parallel-runs",
            type=int,
            default=1,
            show_default=True,
            help="Local: runs at once (one GPU each).",
        ),
        click.option(
            "--ray-address",
            help="Ray: cluster address (HOST:PORT, ray://HOST:PORT, auto); default: start one.",
        ),
        click.option(
            "--gpus-per-run", type=float, default=0, show_default=True, help="Ray: GPUs per training run."
        ),
        click.option(
            "--cpus-per-run", type=float, default=1, show_default=True, help="Ray: CPUs per training run."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f
