"""`adaptlab plan`: will it fit, how long will it take, and which method, before training anything.

adaptlab plan --model smollm2-135m --data python-stdlib --memory 24GiB
adaptlab plan --model smollm2-135m --data notes.jsonl --task ift --ranks 8,16,64 --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from adaptlab.cli.options import finite
from adaptlab.config import PRECISIONS


def _ranks(text: str) -> list[int]:
    from adaptlab.errors import UserError

    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ranks {text!r}: expected comma-separated integers like 8,16,64") from None
    if not ranks or any(r < 1 for r in ranks):
        raise UserError(f"--ranks {text!r}: expected positive integers like 8,16,64")
    return ranks


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    d, s = result["data"], result["setup"]
    tokens = f"{d['tokens']:,}" + (
        "" if d["exact"] else f" +- {d['tokens_ci95']:,} (95% CI, {d['sampled_documents']} docs sampled)"
    )
    console.print(
        f"[bold]{result['model']}[/bold] on {', '.join(d['sources'])}: {d['documents']:,} documents, {tokens} tokens; "
        f"{d['tokens_per_epoch']:,} training tokens per epoch at seq len {s['seq_len']} ({result['task']})"
    )
    console.print(
        f"{s['device']} {s['precision']}, batch {s['batch']} x accum {s['grad_accum']} x {s['seq_len']}, "
        f"{s['steps_per_epoch']:,} steps/epoch, memory limit {_size(s['memory_limit_bytes'])}; "
        f"throughput: {result['throughput']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s matmul, "
        f"{result['throughput']['mem_bytes_per_s'] / 1e9:.1f} GB/s ({result['throughput']['device']})"
    )
    # two narrow tables rather than one wide one, so both read on an 80-column terminal
    table = Table(title="estimates (time is an estimate from FLOPs and a device micro-benchmark)")
    for col in ("method", "trainable", "peak mem", "fits", "time/epoch", "artifact", "lr"):
        table.add_column(col, justify="left" if col == "method" else "right")
    breakdown = Table(title="peak memory, by component")
    for col in ("method", "weights", "grads+opt", "activations", "with ckpt", "logits"):
        breakdown.add_column(col, justify="left" if col == "method" else "right")
    for key, m in result["methods"].items():
        mem = m["memory"]
        name = key + (f" r={m['rank']}" if m["rank"] else "")
        table.add_row(
            name,
            f"{m['trainable_params'] / 1e6:.2f}M",
            _size(m["peak_mem_bytes"]),
            "yes" if m["fits"] else "[red]no[/red]",
            _duration(m["time_per_epoch_s"]),
            _size(m["artifact_bytes"]),
            f"{m['lr']:g}",
        )
        breakdown.add_row(
            name,
            _size(mem["weights"]),
            _size(mem["gradients"] + mem["optimizer"]),
            _size(mem["activations_no_checkpointing"]),
            _size(mem["activations_checkpointing"]),
            _size(mem["logits"]),
        )
    console.print(table)
    compiled = [key for key, m in result["methods"].items() if m["compile"]["on"]]
    if compiled:
        console.print(
            f"compile: {', '.join(compiled)} would run compiled; time/epoch is the eager "
            "loop's, which whole bf16 runs here measured 1.14-1.2x slower (docs/benchmarks.md, --compile)"
        )
    for key, m in result["methods"].items():  # what train applies, and what the estimates model
        console.print(f"[dim]{key}: {'; '.join(m['transforms']['why'].values())}[/dim]")
    console.print(breakdown)
    cap = result["capacity"]
    for w in cap["warnings"]:
        console.print(f"[yellow]capacity warning:[/yellow] {w}")
    console.print(f"[dim]{cap['heuristic']}[/dim]")
    sug = result["suggested"]
    console.print(f"learning rates: {sug['lr']['note']}; batch: {sug['batch']['note']}")
    rec = result["recommendation"]
    console.print(f"\n[bold]recommendation: {rec['method']}[/bold]")
    for reason in rec["reasons"]:
        console.print(f"  - {reason}")
    console.print("confirm it on your data:")
    for line in rec["command"].splitlines():  # DPO: one train command per method
        console.print(f"  {line}", soft_wrap=True)


@click.command("plan")
@click.option(
    "--model", required=True, help="Base model: smollm2-135m, tiny-random, a local HF dir or a hub id."
)
@click.option("--data", multiple=True, required=True, help="Training data: file, dir, glob, python-stdlib.")
@click.option(
    "--task",
    type=click.Choice(["cpt", "ift", "dpo", "grpo"]),
    help="cpt (text), ift (instructions), dpo, grpo (--data arithmetic or prompt/answer JSONL).",
)
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--batch", type=int, default=4, show_default=True, help="Sequences per micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True)
@click.option("--ranks", default="16", show_default=True, help="LoRA ranks to plan, e.g. 8,16,64.")
@click.option(
    "--targets", default="all-linear", show_default=True, help="attention | mlp | all-linear | list."
)
@click.option("--memory", help="Memory to fit in, e.g. 24GiB, 16GB (default: this device's).")
@click.option(
    "--device", type=click.Choice(["cpu", "cuda"]), help="Device to plan for (default: this machine's)."
)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option(
    "--epochs",
    type=click.FloatRange(min=0.0, min_open=True, max=1e6),
    default=1.0,
    show_default=True,
    callback=finite,
)
@click.option("--grad-checkpointing", is_flag=True, help="Plan with gradient checkpointing on.")
@click.option(
    "--compile/--no-compile",
    "compile_",
    default=None,
    help="As `adaptlab train --compile`: plan the paths a compiled (or eager) run takes. Default auto.",
)
@click.option(
    "--optimizer-in-backward", is_flag=True, help="Plan with each gradient applied and freed in backward."
)
@click.option(
    "--dropout",
    type=float,
    default=0.0,
    show_default=True,
    help="LoRA dropout train will use (its masks kept for backward).",
)
@click.option("--group-size", type=int, help="With --task grpo: completions sampled per prompt [default: 8].")
@click.option(
    "--max-new-tokens", type=int, help="With --task grpo: longest sampled completion [default: 32]."
)
@click.option(
    "--kl-beta",
    type=float,
    default=0.0,
    show_default=True,
    help="With --task grpo: the KL penalty train will use (> 0 adds the reference's pass).",
)
@click.option("--no-benchmark", is_flag=True, help="Skip the device micro-benchmark (nominal throughput).")
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="Plan one run on N GPUs: per-device memory under DDP and FSDP2.",
)
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), help="With --gpus: only this strategy.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--compare-root", default="runs", show_default=True, help="Quote comparisons of this base found here."
)
def plan_command(
    data: tuple[str, ...],
    ranks: str,
    no_benchmark: bool,
    as_json: bool,
    gpus: int | None,
    parallel: str | None,
    compile_: bool | None,
    **flags: Any,
) -> None:
    """Estimate memory, time and LoRA capacity for full, LoRA, DoRA and QLoRA, and recommend one."""
    from adaptlab.data.sources import check_names

    check_names(flags.get("model"), list(data))  # before torch is imported: a wrong name fails at once
    root = flags.get("compare_root")
    given = click.get_current_context().get_parameter_source("compare_root") != ParameterSource.DEFAULT
    if given and root and not Path(root).is_dir():
        raise click.BadParameter(
            f"{root}: no such directory (a folder of comparisons)", param_hint="--compare-root"
        )
    from adaptlab.plan import parse_memory, plan

    memory = parse_memory(flags.pop("memory")) if flags.get("memory") else flags.pop("memory")
    flags["compile"] = "auto" if compile_ is None else compile_
    world_args = None
    if gpus is not None or parallel is not None:
        from adaptlab.plan.world import world_args_from

        world_args = world_args_from(gpus, parallel, memory, flags, _ranks(ranks))
    result = plan(data=list(data), ranks=_ranks(ranks), memory=memory, benchmark=not no_benchmark, **flags)
    if world_args is not None:
        from adaptlab.plan.world import grpo_steps_from, plan_world

        result["world"] = plan_world(**world_args, grpo=grpo_steps_from(result))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print(result)
        if world_args is not None:
            _print_world(result["world"])


def _print_world(world: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{world['gpus']} GPUs, {_size(world['memory_per_device_bytes'])} each: peak memory per device "
        f"(micro-batch {world['device_micro_batch']} per device)"
    )
    table.add_column("method", justify="left")
    for strategy in world["strategies"]:
        table.add_column(strategy, justify="right")
    table.add_column("use", justify="left")
    for key, m in world["methods"].items():
        cells = []
        for strategy in world["strategies"]:
            e = m.get(strategy)
            cells.append(
                "cannot shard"
                if e is None
                else _size(e["peak_mem_bytes"]) + ("" if e["fits"] else " [red](no)[/red]")
            )
        use = m["strategy"] or "[red]does not fit: more GPUs, QLoRA or --grad-checkpointing[/red]"
        table.add_row(key + (f" r={m['rank']}" if m["rank"] else ""), *cells, use)
    Console().print(table)
