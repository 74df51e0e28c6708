"""`adaptlab merge` and `adaptlab combine`: turn adapters into a plain model, or several adapters into one."""

from __future__ import annotations

import click

from adaptlab.cli.options import finite, push_to_hub_option
from adaptlab.errors import UserError


@click.command("merge")
@click.option("--adapter", required=True, help="Run directory or PEFT adapter directory.")
@click.option("--out", required=True, type=click.Path(), help="New directory for the merged HF model.")
@click.option(
    "--base", default=None, help="Base model (embedded name, local dir, hub id); default: the adapter's."
)
@click.option(
    "--into",
    type=click.Choice(["full", "dequantized"]),
    default=None,
    help="QLoRA adapters only: merge into the full-precision base or the dequantized 4-bit one.",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0.0),
    default=1e-4,
    show_default=True,
    callback=finite,
    help="Max abs logit difference allowed (fp32).",
)
@push_to_hub_option("the merged model")
def merge_command(
    adapter: str, out: str, base: str | None, into: str | None, tolerance: float, push_to_hub: str | None
) -> None:
    """Merge an adapter into its base and write a plain HF model (safetensors), verified by logits."""
    from adaptlab.adapters import merge_adapter
    from adaptlab.publish import check_push

    check_push(push_to_hub)
    report = merge_adapter(adapter, out, base, into=into, tolerance=tolerance)  # type: ignore[arg-type]
    click.echo(
        f"merged {report.adapter} into {report.base} -> {report.out}\n"
        f"check: max |logit difference| vs base + adapter = {report.max_abs_diff:.3g} over "
        f"{report.tokens_checked} tokens (tolerance {report.tolerance:g}, {report.dtype})"
    )
    if report.max_abs_diff_fp64 is not None:
        click.echo(f"       in fp64 (fp32 rounding excluded): {report.max_abs_diff_fp64:.3g}")
    if push_to_hub:
        from adaptlab.publish import push_merged

        click.echo(f"pushed to {push_to_hub}: {push_merged(adapter, out, push_to_hub)}")


def _weights(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise UserError(f"--weights {value!r}: give comma-separated numbers, e.g. 0.5,0.5") from None


@click.command("combine")
@click.option(
    "--adapter", "adapters", multiple=True, required=True, help="Adapter (run dir or PEFT dir); repeat."
)
@click.option("--out", required=True, type=click.Path(), help="New directory for the combined adapter.")
@click.option("--base", default=None, help="Base model; default: the one the adapters record.")
@click.option("--weights", default=None, help="Comma-separated, one per adapter (default 1/n each).")
@click.option("--how", type=click.Choice(["linear", "cat", "ties"]), default="linear", show_default=True)
@click.option(
    "--density", type=float, default=None, help="Fraction of each delta kept by ties (default 0.2)."
)
@click.option(
    "--data", multiple=True, help="Held-out text of each adapter's domain (.jsonl `text` or .txt), in order."
)
@click.option("--general", default=None, help="General-text probe (.jsonl `text` or .txt).")
@click.option("--max-texts", default=64, show_default=True, help="Texts used from each file.")
@click.option("--max-length", default=256, show_default=True, help="Tokens per text.")
def combine_command(
    adapters: tuple[str, ...],
    out: str,
    base: str | None,
    weights: str | None,
    how: str,
    density: float | None,
    data: tuple[str, ...],
    general: str | None,
    max_texts: int,
    max_length: int,
) -> None:
    """Combine adapters into one (peft linear|cat|ties) and measure it on each domain and general text."""
    from rich.console import Console
    from rich.table import Table

    from adaptlab.adapters import combine_adapters

    report = combine_adapters(
        list(adapters),
        out,
        base,
        weights=_weights(weights),
        how=how,  # type: ignore[arg-type]
        density=density,
        data=list(data),
        general=general,
        max_texts=max_texts,
        max_length=max_length,
    )
    extra = f", density {report.density}" if report.density is not None else ""
    click.echo(
        f"combined {', '.join(report.adapters)} ({report.how}, weights {report.weights}{extra}) -> {report.out}"
    )
    if not report.nll:
        click.echo("no --data or --general given: nothing evaluated")
        return
    table = Table(title="NLL per token (nats; lower is better; change vs base in brackets)")
    table.add_column("model")
    for ds in report.datasets:
        table.add_column(ds, justify="right")
    for model, row in report.nll.items():
        cells = []
        for ds in report.datasets:
            own = report.domain_of.get(model) == ds
            delta = "" if model == "base" else f" ({row[ds] - report.nll['base'][ds]:+.3f})"
            cells.append(f"{'[bold]' if own else ''}{row[ds]:.3f}{delta}{'[/bold]' if own else ''}")
        table.add_row(model, *cells)
    Console().print(table)
    for ds, gap in report.interference().items():
        click.echo(f"interference on {ds}: combined is {gap:+.3f} nats/token vs its own adapter")
