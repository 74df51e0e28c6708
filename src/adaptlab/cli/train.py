"""`adaptlab train`: train one method on one data set and write a run directory.

adaptlab train --model tiny-random --method lora --data python-stdlib --steps 20 --out runs/lora
adaptlab train --task dpo --data pairs.jsonl --beta 0.1 --out runs/dpo   # preference pairs
adaptlab train --config run.yaml            # the same fields as RUN/config.yaml
adaptlab train --resume runs/lora           # continue from the newest checkpoint that verifies
adaptlab train --resume runs/lora --lr 1e-4 # ... with a new peak learning rate from there on
adaptlab train --nproc 2 --parallel fsdp ...  # one run on 2 processes (starts torchrun)
torchrun --nproc-per-node 2 -m adaptlab train --parallel ddp ...
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from adaptlab.cli.options import overwrite_option, push_to_hub_option, report_to_option
from adaptlab.config import DPO_LOSSES, METHODS, PRECISIONS, TASKS

RESUME_FLAGS = ("lr",)
"""Flags `--resume` accepts: they change nothing a checkpoint depends on (config.yaml records them)."""


def _same(*names: str) -> dict[str, str]:
    return {name: name for name in names}


FLAG_FIELDS: dict[str, dict[str, str]] = {
    "model": {"name": "model", "init_from": "init_from"},
    "method": _same("method", "rank", "alpha", "dropout", "rslora", "targets"),
    "data": {"train": "data", "text_field": "text_field"},
    "train": _same(
        "steps",
        "tokens",
        "batch",
        "grad_accum",
        "seq_len",
        "lr",
        "warmup",
        "weight_decay",
        "max_grad_norm",
        "save_every",
        "eval_every",
        "seed",
        "precision",
        "grad_checkpointing",
        "optimizer_in_backward",
    )
    | {"compile": "compile_"},
    "objective": {
        "task": "task",
        "beta": "beta",
        "loss": "dpo_loss",
        **_same(
            "group_size", "max_new_tokens", "temperature", "clip_eps", "kl_beta", "reward", "prompts_per_step"
        ),
    },
}
"""Config section -> {field: the flag (click parameter name) that sets it}."""


def _overrides(**flags: Any) -> dict[str, Any]:
    """Nested config overrides from the flags the user actually gave (a repeated flag: a list)."""
    out: dict[str, Any] = {}
    for section, fields in FLAG_FIELDS.items():
        given = {
            field: list(value) if isinstance(value, tuple) else value
            for field, flag in fields.items()
            if (value := flags[flag]) not in (None, ())
        }
        if given:
            out[section] = given
    if flags["out"] is not None:
        out["out"] = flags["out"]
    return out


@click.command("train")
@click.option(
    "--config", "config_path", type=click.Path(), help="YAML with model/method/data/train sections."
)
@click.option("--model", help="Base model: smollm2-135m, tiny-random, a local HF dir or a hub id.")
@click.option(
    "--init-from", type=click.Path(), help="Start from this finished run's weights (adapter or full model)."
)
@click.option("--method", type=click.Choice(METHODS), help="full | lora | dora | qlora.")
@click.option("--rank", type=int, help="LoRA rank r (default 16).")
@click.option("--alpha", type=float, help="LoRA alpha (default 2 x rank).")
@click.option("--dropout", type=float, help="LoRA dropout (default 0).")
@click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised scaling alpha/sqrt(r).")
@click.option("--targets", help="attention | mlp | all-linear | comma list of module names.")
@click.option(
    "--data", multiple=True, help="Training data: file, dir, glob, datasets dir, hub name, python-stdlib."
)
@click.option("--text-field", help="JSONL field holding the text (default `text`).")
@click.option("--steps", type=int, help="Optimizer steps (or give --tokens).")
@click.option("--tokens", type=int, help="Token budget; steps = tokens / (batch x grad-accum x seq-len).")
@click.option("--batch", type=int, help="Sequences per micro-batch (default 4).")
@click.option("--grad-accum", type=int, help="Micro-batches per step (default 1).")
@click.option("--seq-len", type=int, help="Tokens per sequence (default 256).")
@click.option("--lr", type=float, help="Peak LR (default 2e-5 full, 2e-4 LoRA family).")
@click.option("--warmup", type=float, help="Warmup fraction of steps (default 0.05).")
@click.option("--weight-decay", type=float)
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm (default 1.0).")
@click.option("--save-every", type=int, help="Checkpoint every N steps.")
@click.option("--eval-every", type=int, help="Validation loss every N steps.")
@click.option("--seed", type=int)
@click.option("--precision", type=click.Choice(PRECISIONS), help="auto | fp32 | bf16 (default auto).")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None)
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=None,
    help="torch.compile each decoder layer (first steps slower while it compiles). Default auto: only a long "
    "single-process bf16 full or LoRA SFT run on a CPU with native bf16, where it was measured to pay back.",
)
@click.option(
    "--optimizer-in-backward/--no-optimizer-in-backward",
    default=None,
    help="Update each parameter as soon as its gradient is complete and free it (less memory; no clipping).",
)
@click.option("--task", type=click.Choice(TASKS), help="What a step minimises: sft (default) | dpo | grpo.")
@click.option("--beta", type=float, help="DPO: beta, the strength of the KL to the reference (default 0.1).")
@click.option("--dpo-loss", type=click.Choice(DPO_LOSSES), help="DPO loss: sigmoid (default) | ipo.")
@click.option("--group-size", type=int, help="GRPO: completions sampled per prompt (default 8).")
@click.option("--max-new-tokens", type=int, help="GRPO: longest sampled completion (default 32).")
@click.option("--temperature", type=float, help="GRPO: sampling temperature (default 1.0).")
@click.option("--clip-eps", type=float, help="GRPO: policy-ratio clip (default 0.2).")
@click.option("--kl-beta", type=float, help="GRPO: weight of the KL to the reference (default 0).")
@click.option(
    "--reward", help="GRPO: exact | regex:PATTERN (its first group) | python:module:function (default exact)."
)
@click.option(
    "--prompts-per-step", type=int, help="GRPO: prompts sampled per step (default batch x grad-accum)."
)
@click.option("--out", type=click.Path(), help="Run directory to write.")
@click.option(
    "--resume",
    type=click.Path(),
    help="Continue the run in this directory from its newest valid checkpoint (with --lr: a new peak LR).",
)
@overwrite_option
@click.option(
    "--parallel",
    type=click.Choice(["ddp", "fsdp", "auto"]),
    help="Several processes: ddp replicates the model, fsdp shards it (FSDP2), auto: fsdp if it does not fit one GPU.",
)
@click.option(
    "--nproc", type=int, help="Train on N processes of this machine (starts torchrun; one per GPU)."
)
@click.option(
    "--no-memory-check",
    "no_memory_check",
    is_flag=True,
    help="Start even when the planned peak memory exceeds the memory available (adaptlab plan's estimate).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@report_to_option("metrics", kind_uri="KIND=URI for a location")
@push_to_hub_option("the finished run's adapter/model")
@click.pass_context
def train_command(
    ctx: click.Context,
    config_path: str | None,
    resume: str | None,
    quiet: bool,
    no_memory_check: bool,
    overwrite: bool,
    parallel: str | None,
    nproc: int | None,
    report_to: tuple[str, ...],
    push_to_hub: str | None,
    **flags: Any,
) -> None:
    """Train full fine-tuning or a LoRA-family adapter and write a run directory."""
    from adaptlab.errors import UserError

    if nproc is not None and nproc < 1:
        raise UserError(f"--nproc {nproc}: the number of processes must be at least 1")
    targets, push_to_hub = _reporting(report_to, push_to_hub)
    config = None
    if not resume:
        try:
            config = _new_run_config(config_path, flags)
        except UserError:
            if os.environ.get("RANK", "0") != "0":  # under torchrun every rank meets it: rank 0 says it
                raise SystemExit(2) from None
            raise
    from adaptlab import distributed as dist
    from adaptlab.optim_backward import check_one_process

    world = dist.world_from_env()
    try:
        _check_resume(resume, overwrite, config_path, flags)
        if nproc is not None:
            if config is not None:
                check_one_process(config.train.optimizer_in_backward, nproc)
            _launch(ctx, nproc, parallel, config, resume)
            return
        if config is not None and not world.distributed and not no_memory_check:
            _check_memory(config)
        run_dir = resume if config is None else config.out
        reporter_targets = targets if world.is_main else []
        summary = _run(
            config, resume, flags.get("lr"), quiet or not world.is_main, reporter_targets, overwrite, parallel
        )
    except UserError as err:
        # every rank meets the same error, so rank 0 says it once; under --nproc the launcher names a
        # lost rank itself
        lost = isinstance(err, dist.RankLost) and os.environ.get(dist.LAUNCHED_ENV)
        if world.is_main and not lost:
            raise
        raise SystemExit(2) from None
    if world.is_main:
        if not os.environ.get(dist.LAUNCHED_ENV):  # under --nproc the launcher prints it once the ranks exit
            click.echo(json.dumps(summary, indent=2))
        if push_to_hub:
            from adaptlab.publish import push_run

            click.echo(f"pushed to {push_to_hub}: {push_run(run_dir, push_to_hub)}", err=True)


def _reporting(report_to: tuple[str, ...], push_to_hub: str | None) -> tuple[list[Any], str | None]:
    """The trackers to report to and the Hub repo to push to, both checked; none on ranks other than 0."""
    from adaptlab.publish import check_push
    from adaptlab.tracking import check_targets, parse_report_to

    targets = parse_report_to(report_to)
    if os.environ.get("RANK", "0") != "0":  # only rank 0 reports or uploads
        return [], None
    check_targets(targets)
    check_push(push_to_hub)
    return targets, push_to_hub


def _check_resume(
    resume: str | None, overwrite: bool, config_path: str | None, flags: dict[str, Any]
) -> None:
    """--resume runs the run's own config: it takes neither --overwrite, --config nor run flags but --lr."""
    from adaptlab.errors import UserError

    if resume and overwrite:
        raise UserError("Can't provide both --resume and --overwrite. Choose one.")
    if resume:
        given = {k: v for k, v in flags.items() if v not in (None, ()) and k not in RESUME_FLAGS}
        if given or config_path:
            names = ", ".join(f"--{k.rstrip('_').replace('_', '-')}" for k in given) or "--config"
            raise UserError(f"--resume takes the run's own config; only --lr may change: drop {names}")


def _run(
    config: Any,
    resume: str | None,
    lr: float | None,
    quiet: bool,
    targets: list[Any],
    overwrite: bool,
    parallel: str | None,
) -> dict[str, Any]:
    """Train `config` (or resume the run at `resume`) in this process, showing progress unless quiet and
    reporting to `targets`; the run's summary."""
    from adaptlab.tracking import RunReporter
    from adaptlab.train import resume_run, train

    progress = _Progress(quiet)
    run_dir = resume if config is None else config.out
    reporter = RunReporter(targets, run_dir)
    try:
        if config is None:
            summary = progress.run(
                lambda start, log: resume_run(
                    resume,
                    on_start=start,
                    on_log=reporter.wrap(log),
                    lr=lr,
                    parallel=parallel,
                    fits_one_device=fits_one_gpu,
                )
            )
        else:
            summary = progress.run(
                lambda start, log: train(
                    config,
                    on_start=start,
                    on_log=reporter.wrap(log),
                    overwrite=overwrite,
                    parallel=parallel,
                    fits_one_device=fits_one_gpu,
                )
            )
    except BaseException:
        reporter.abort()
        raise
    reporter.finish(summary)
    return summary


def _new_run_config(config_path: str | None, flags: dict[str, Any]) -> Any:
    """The config of a new run from --config and flags, its names checked before torch is imported, so
    a model or data name that cannot be found fails at once."""
    from adaptlab.config import build_config, load_config, merge
    from adaptlab.data.sources import check_names
    from adaptlab.errors import UserError

    config = build_config(merge(load_config(config_path) if config_path else {}, _overrides(**flags)))
    if config.out is None:
        raise UserError("no run directory: pass --out RUN (or `out:` in the config)")
    _check_flags_apply(config, flags)
    check_names(config.model.name, config.data.train)
    return config


def _check_memory(config: Any) -> None:
    """Refuse, before loading anything, a one-process run whose planned peak exceeds the memory available."""
    from adaptlab.hardware import choose_precision, pick_device
    from adaptlab.plan.fit import check_run_fits

    device = pick_device()
    check_run_fits(config, device, choose_precision(config.train.precision, device))


APPLIES_TO = {
    **dict.fromkeys(set(FLAG_FIELDS["objective"].values()) - {"task", "beta", "dpo_loss"}, "grpo"),
    "beta": "dpo",
    "dpo_loss": "dpo",
}
"""Flags that only one task uses: given with another task they are refused, not ignored (the LoRA family's
own flags follow config.LORA_FIELDS)."""


def _check_flags_apply(config: Any, flags: dict[str, Any]) -> None:
    from adaptlab.config import lora_fields_misused
    from adaptlab.errors import UserError

    def name(flag: str) -> str:
        return "--" + ("no-" if flags[flag] is False else "") + flag.replace("_", "-")

    given = [flag for flag, value in flags.items() if value not in (None, ())]
    task = config.objective.task
    for flag, scope in APPLIES_TO.items():
        if flag in given and task != scope:
            raise UserError(
                f"{name(flag)} applies to --task {scope}; this run is --task {task}: drop {name(flag)}"
            )
    for flag in lora_fields_misused(config.method.method, given):
        raise UserError(
            f"{name(flag)} applies to the LoRA family (--method lora, dora or qlora); this run is "
            f"--method {config.method.method}: drop {name(flag)}"
        )


def fits_one_gpu(config: Any, device: Any) -> bool | None:
    """Whether a whole replica fits one GPU by the planner's memory model (what --parallel auto asks);
    None off CUDA or when it cannot be told."""
    if device.type != "cuda":
        return None
    import torch

    from adaptlab.errors import UserError
    from adaptlab.plan.world import fits_one_device

    t = config.train
    try:
        memory = torch.cuda.get_device_properties(device).total_memory
        return fits_one_device(config.model.name, config.method.method, t.batch, t.seq_len, "bf16", memory)
    except (UserError, KeyError, ValueError):
        return None


def _launch(ctx: click.Context, nproc: int, parallel: str | None, config: Any, resume: str | None) -> None:
    """Check what can be checked here, then start `nproc` ranks of this same command under torchrun."""
    from pathlib import Path

    from adaptlab import distributed as dist
    from adaptlab.config import build_config, load_config

    if dist.launched_by_torchrun():
        raise click.UsageError("--nproc starts torchrun itself: drop it when launching with torchrun")
    if config is None:
        path = Path(resume or "") / "config.yaml"
        config = build_config(load_config(path)) if path.exists() else None
    if config is not None:
        world = dist.World(0, nproc, 0)
        dist.check_parallel(parallel, config.method.method, world)
        dist.check_global_batch(config.train.batch * config.train.grad_accum, world)
    run_dir = resume or (config.out if config else None)
    try:
        note = dist.launch(nproc, _argv(ctx, drop=("nproc",)), run_dir)
    except dist.RunStopped as stop:
        if stop.message is None:  # a rank printed its own error line
            raise SystemExit(stop.code) from None
        err = click.ClickException(stop.message)
        err.exit_code = stop.code
        raise err from None
    if note:  # a rank died after the run finished
        click.echo(f"warning: {note}", err=True)
    summary = Path(run_dir or "") / "summary.json"
    if run_dir and summary.exists():
        click.echo(summary.read_text().rstrip("\n"))


def _argv(ctx: click.Context, drop: tuple[str, ...]) -> list[str]:
    """The command line that gave ctx.params, without the options in `drop`."""
    out: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in drop:
            continue
        value = ctx.params.get(param.name)
        if value is None or value == () or (param.is_flag and not param.secondary_opts and not value):
            continue
        if param.is_flag:
            out.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.multiple:
            for v in value:
                out += [param.opts[0], str(v)]
        else:
            out += [param.opts[0], str(value)]
    return out


VAL_ROW_KEYS = ("step", "tokens", "split")
"""Keys of a validation row that are not figures."""


class _Progress:
    """Training progress on stderr: a rich bar (step, loss, tokens/s, ETA) on a terminal, whole lines otherwise.

    Redirected to a file or a pipe, a bar's redraws would be a line never ended: a process stopped
    mid-run would leave it open and the next writer's line (a launcher's error) would start inside it.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.total = 0

    def on_start(self, setup: Any) -> None:
        c = setup.config
        click.echo(
            f"{c.method.method} on {c.model.name}: {setup.report}; {len(setup.train_examples)} train examples, "
            f"{setup.total_steps} steps of {c.train.batch}x{c.train.grad_accum}x{c.train.seq_len} tokens, "
            f"lr {c.resolved_lr():g}, {setup.precision} on {setup.device}",
            err=True,
        )
        self.total = setup.total_steps
        if not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=setup.total_steps, info="")

    def on_log(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        if row.get("split") == "val":  # the objective's validation figures: val_loss, task_acc, ...
            figures = (f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items() if k not in VAL_ROW_KEYS)
            self._line(f"step {row['step']}: {', '.join(figures)}")
            return
        info = f"loss {row['loss']:.4f}  {row['tokens_per_s']:.0f} tok/s"
        if self.bar is None:
            self._line(f"step {row['step']}/{self.total}: {info}")
        else:
            self.bar.update(self.task, completed=row["step"], info=info)

    def _line(self, text: str) -> None:
        if self.bar is None:
            click.echo(text, err=True)
        else:
            self.bar.console.print(text)

    def run(self, fn: Any) -> Any:
        try:
            return fn(self.on_start, self.on_log)
        finally:
            if self.bar is not None:
                self.bar.stop()
