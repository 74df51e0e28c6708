"""`adaptlab compare` and `adaptlab demo`: LoRA vs full fine-tuning head to head, with a report.

adaptlab compare --config examples/compare.yaml --out runs/cmp
adaptlab compare --model tiny-random --data python-stdlib --study methods --tokens 20000 --out runs/cmp
adaptlab demo                        # full vs LoRA, LoRA-attn, DoRA on smollm2-135m, about 15 min on 2 CPU cores
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from adaptlab.cli.options import executor_options, overwrite_option, push_to_hub_option, report_to_option
from adaptlab.config import COMPARE_SEEDS, EVAL_DOCS, RANK_SCALINGS
from adaptlab.errors import UserError


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Nested spec fields from the flags the user gave."""
    out: dict[str, Any] = {}
    if flags["model"]:
        out["model"] = flags["model"]
    if flags["data"]:
        out["data"] = {"train": list(flags["data"])}
    for key in ("general", "mc", "study_data"):
        if flags[key]:
            out[key] = list(flags[key])
    for key in ("tokens", "seeds", "study", "target_tokens", "rank_scaling", "lr_grid"):
        if flags[key] is not None:
            out[key] = flags[key]
    if flags["drift"] is not None:
        out["drift"] = flags["drift"]
    train = {k: flags[k] for k in ("batch", "seq_len", "lr") if flags[k] is not None}
    if train:
        out["train"] = train
    if flags["eval_docs"] is not None:
        out["eval"] = {"max_docs": flags["eval_docs"]}
    if flags["no_analysis"]:
        out["analysis"] = {"enabled": False}
    limits = {"forgetting": flags["forgetting_limit"], "memory_gb": flags["memory_limit_gb"]}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        out["limits"] = limits
    return out


def _lr_grid(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give numbers separated by commas, e.g. 0.3,1,3,10") from None


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) while the block runs, so the comparison stops its children."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Printer:
    """Per-arm progress lines on stderr: at start, every ~10% of steps (or 30 s), at the end."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.last: dict[str, tuple[int, float]] = {}
        self.steps: dict[str, int] = {}
        self.tag: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def echo(self, text: str) -> None:
        elapsed = time.perf_counter() - self.t0
        click.echo(f"[{elapsed / 60:5.1f} min] {text}", err=True)

    def __call__(self, e: dict[str, Any]) -> None:
        kind, run = e["event"], e.get("run", "")
        if "index" in e:
            self.tag[run] = f"({e['index']}/{e['total']}) {run}"
        tag = self.tag.get(run, run)
        if kind == "plan":
            self.echo(f"{len(e['arms'])} arms, {len(e['runs'])} training runs: {', '.join(e['runs'])}")
            for note in e["notes"]:
                self.echo(f"  note: {note}")
        elif kind == "train_start":
            self.started[run] = time.perf_counter()
            self.steps[run] = e["steps"]
            self.last[run] = (0, time.perf_counter())
            verb = "resuming" if e["resume"] else "training"
            self.echo(f"{tag}: {verb}, {e['steps']} steps at lr {e['lr']:.2g}")
        elif kind == "train_skip":
            self.echo(f"{tag}: finished earlier, skipped")
        elif kind == "retrain":
            self.echo(f"{tag}: retraining ({e['reason']})")
        elif kind == "step":
            total = e.get("total_steps") or self.steps.get(run, 0)
            step, now = e["step"], time.perf_counter()
            last_step, last_t = self.last.get(run, (0, now))
            if step == total or step - last_step >= max(1, total // 10) or now - last_t > 30:
                self.last[run] = (step, now)
                took = now - self.started.get(run, now)
                eta = took / step * (total - step) if step else 0.0
                self.echo(
                    f"{tag}: step {step}/{total}  loss {e['loss']:.4f}  {e['tokens_per_s']:.0f} tok/s  "
                    f"ETA {eta:.0f} s"
                )
        elif kind == "val":
            self.echo(f"{tag}: val loss {e['val_loss']:.4f} at {e['tokens']:,} tokens")
        elif kind == "train_done":
            self.echo(f"{tag}: trained in {e['wall_s']:.0f} s")
        elif kind == "train_failed":
            self.echo(f"{tag}: FAILED: {e['error']} (log: {e['log']})")
        elif kind == "eval_start":
            self.echo(f"{run}: evaluating (learning, forgetting)")
        elif kind == "eval_progress" and e["tokens"] == 0:
            self.echo(f"{run}: eval {e['stage']}")
        elif kind == "analysis_start":
            self.echo(f"{run}: analysing weight updates")
        elif kind == "eval_failed":
            self.echo(f"{run}: evaluation FAILED: {e['error']}")


def _finish(results: dict[str, Any], out: str) -> None:
    failed = [a["name"] for a in results["arms"] if a.get("status") != "ok"]
    report = results.get("report", {})
    click.echo(f"results: {out}/results.json")
    if report:
        click.echo(f"report:  {report.get('html')}  (and {report.get('md')})")
    click.echo("")
    click.echo(results["recommendation"]["summary"])
    if failed:  # the comparison finished; exit 1 so scripts notice the arms that did not
        raise click.ClickException(
            f"{len(failed)} arm(s) did not finish: {', '.join(failed)}; see the report"
        )


@click.command("compare")
@click.option("--config", "config_path", type=click.Path(), help="compare.yaml (see examples/compare.yaml).")
@click.option(
    "--out", required=True, type=click.Path(), help="Output directory (runs/, results.json, report.*)."
)
@click.option("--model", help="Base model: smollm2-135m, tiny-random, a local HF dir or a hub id.")
@click.option(
    "--data", multiple=True, help="Target-domain data (file, dir, glob, python-stdlib); repeatable."
)
@click.option("--general", multiple=True, help="General-domain text: forgetting as its NLL increase.")
@click.option("--mc", multiple=True, type=click.Path(), help="General multiple-choice JSONL files.")
@click.option("--drift/--no-drift", default=None, help="Measure drift KL(base || tuned) (default on).")
@click.option(
    "--study",
    type=click.Choice(
        ["methods", "rank", "lr", "batch", "targets", "data-size", "regime", "continual", "rl", "sft-vs-rl"]
    ),
    help="rl: GRPO with LoRA r1/r4/r16 vs full; sft-vs-rl: SFT on the answers vs GRPO (compare/rl.py).",
)
@click.option(
    "--study-data",
    multiple=True,
    help="regime: the domain as instruction pairs; continual: domain B (trained after --data).",
)
@click.option(
    "--rank-scaling",
    type=click.Choice(RANK_SCALINGS),
    help="Rank study: rslora (default) scales every rank's update by alpha/sqrt(r) with one alpha, so the "
    "update scale stays fixed across ranks; alpha-2r uses alpha = 2 x rank.",
)
@click.option(
    "--lr-grid",
    callback=lambda ctx, param, value: _lr_grid(value),
    help="LR study: the LRs full and LoRA both sweep, as multiples of the base LR, comma-separated "
    "(default 0.3,1,3,10,30,100,300).",
)
@click.option("--tokens", type=int, help="Budget: tokens every arm sees.")
@click.option(
    "--seeds",
    type=int,
    help=f"Replicates per arm (default {COMPARE_SEEDS}; 1 is reported as unreplicated): mean and spread "
    "are reported.",
)
@click.option(
    "--target-tokens", type=int, help="Extrapolate arms measured at several budgets to this many tokens."
)
@click.option("--batch", type=int, help="Sequences per micro-batch (default 4).")
@click.option("--seq-len", type=int, help="Tokens per sequence (default 256).")
@click.option("--lr", type=float, help="Base LR: full uses it, the LoRA family 10x (default 2e-5).")
@click.option("--eval-docs", type=int, help=f"Held-out documents scored per probe (default {EVAL_DOCS}).")
@click.option("--no-analysis", is_flag=True, help="Skip the weight-update analysis.")
@click.option("--forgetting-limit", type=float, help="Largest acceptable forgetting (nats/token).")
@click.option("--memory-limit-gb", type=float, help="Largest acceptable peak training memory (GB).")
@click.option("--force", multiple=True, help="Retrain this arm (or run) even if finished; repeatable.")
@overwrite_option
@executor_options
@report_to_option("every run and the report")
@push_to_hub_option("the recommended arm's artifact")
def compare_command(
    config_path: str | None,
    out: str,
    force: tuple[str, ...],
    overwrite: bool,
    executor: str,
    parallel_runs: int,
    ray_address: str | None,
    gpus_per_run: float,
    cpus_per_run: float,
    report_to: tuple[str, ...],
    push_to_hub: str | None,
    **flags: Any,
) -> None:
    """Train LoRA-family and full fine-tuning arms under one budget; report learning, forgetting, cost."""
    from adaptlab.compare import build_spec, compare
    from adaptlab.compare.executors import make_executor
    from adaptlab.compare.spec import load_spec_file
    from adaptlab.config import merge
    from adaptlab.models import quiet_transformers
    from adaptlab.publish import check_push
    from adaptlab.tracking import check_targets, parse_report_to

    targets = parse_report_to(report_to)
    check_targets(targets)
    check_push(push_to_hub)
    if flags["study"] in ("rl", "sft-vs-rl"):
        _check_rl_flags(flags, config_path, force, executor, parallel_runs)
        _rl_study(flags, out, overwrite)
        _publish(out, targets, push_to_hub)
        return
    base = load_spec_file(config_path) if config_path else {}
    if flags["study"] and base.get("arms"):  # the config's arms would run under the study's name
        raise UserError(f"--study and a config with arms ({config_path}): choose one")
    data = merge(base, _overrides(flags))
    if not config_path and "study" not in data:
        data["study"] = "methods"
    spec = build_spec(data, source=config_path or "flags")
    runner = make_executor(executor, parallel_runs, ray_address, gpus_per_run, cpus_per_run)
    quiet_transformers()
    inputs = [config_path] if config_path else []
    with stop_on_sigterm():
        results = compare(
            spec, out, force=force, on_event=Printer(), overwrite=overwrite, inputs=inputs, executor=runner
        )
    _publish(out, targets, push_to_hub)
    _finish(results, out)


RL_FLAGS = ("model", "data", "batch", "seq_len", "lr", "seeds", "study")
"""What an RL study takes from the command line; its other settings are compare/rl.py's RLStudy."""


def _check_rl_flags(
    flags: dict[str, Any], config_path: str | None, force: tuple[str, ...], executor: str, parallel_runs: int
) -> None:
    """An RL study refuses, in one line, what it would otherwise ignore (a methods study's settings)."""
    ignored = [
        f"--{k.replace('_', '-')}"
        for k, v in flags.items()
        if k not in RL_FLAGS and v not in (None, (), False)
    ]
    ignored += ["--config"] * bool(config_path) + ["--force"] * bool(force)
    ignored += ["--executor"] * (executor != "local") + ["--parallel-runs"] * (parallel_runs != 1)
    if ignored:
        raise UserError(
            f"--study {flags['study']} does not take {', '.join(ignored)}: it takes --model, --data (one task: "
            "arithmetic or a prompt/answer JSONL), --batch, --seq-len, --lr and --seeds"
        )
    if len(flags["data"]) > 1:
        raise UserError(f"--study {flags['study']} takes one --data (its task), got {len(flags['data'])}")


def _rl_study(flags: dict[str, Any], out: str, overwrite: bool) -> None:
    """An RL study (compare/rl.py): its own arms, GRPO settings and report."""
    from adaptlab.compare.rl import RLStudy, run_study
    from adaptlab.models import quiet_transformers
    from adaptlab.outputs import owned

    given = {
        "model": flags["model"],
        "task": flags["data"][0] if flags["data"] else None,
        "batch": flags["batch"],
        "seq_len": flags["seq_len"],
        "full_lr": flags["lr"],
        "seeds": flags["seeds"],
    }
    study = RLStudy(study=flags["study"], **{k: v for k, v in given.items() if v is not None})
    quiet_transformers()
    with owned(Path(out), "compare", overwrite=overwrite), stop_on_sigterm():
        run_study(study, out, on_event=click.echo)
    click.echo((Path(out) / "report.md").read_text())


def _publish(out: str, targets: Any, push_to_hub: str | None) -> None:
    """Send the finished comparison to the trackers asked for, and its recommended arm to the hub."""
    if targets:
        from adaptlab.tracking import report_comparison

        report_comparison(targets, out)
        click.echo(f"reported to {', '.join(t.kind for t in targets)}", err=True)
    if push_to_hub:
        from adaptlab.publish import push_comparison

        click.echo(f"pushed to {push_to_hub}: {push_comparison(out, push_to_hub)}", err=True)


@click.command("demo")
@click.option(
    "--out", default="adaptlab-demo", show_default=True, type=click.Path(), help="Output directory."
)
@click.option(
    "--tokens", type=int, help="Budget per arm in tokens (default sized for ~15 min on 2 CPU cores)."
)
@click.option("--force", multiple=True, help="Retrain this arm even if finished; repeatable.")
@overwrite_option
def demo_command(out: str, tokens: int | None, force: tuple[str, ...], overwrite: bool) -> None:
    """LoRA vs full fine-tuning on smollm2-135m with Python source as the target domain."""
    from adaptlab.compare import build_spec, compare
    from adaptlab.compare.spec import DEMO_TOKENS, demo_spec
    from adaptlab.models import quiet_transformers

    spec = build_spec(demo_spec(tokens or DEMO_TOKENS), source="demo")
    quiet_transformers()
    printer = Printer()
    printer.echo(
        f"demo: {', '.join(a.name for a in spec.arms)} on smollm2-135m at their swept LRs (full "
        f"{spec.train.lr:g}, LoRA family {spec.train.default_lr('lora'):g}), target python-stdlib, drift "
        f"as the general probe, {spec.tokens:,} tokens per arm -> {out}"
    )
    with stop_on_sigterm():
        results = compare(spec, out, force=force, on_event=printer, overwrite=overwrite)
    printer.echo("done")
    _finish(results, out)
