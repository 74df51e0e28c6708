"""`adaptlab runs`: list the runs and comparisons under directories; `adaptlab runs show RUN`: one in full.

adaptlab runs                                   # everything under the current directory
adaptlab runs runs/ --method lora --where 'forgetting<0.05' --sort -learning
adaptlab runs --json
adaptlab runs show runs/lora
"""

from __future__ import annotations

import json
from typing import Any

import click

COLUMNS = (
    ("path", "run", None),
    ("status", "status", None),
    ("method", "method", None),
    ("base", "base", None),
    ("data", "data", None),
    ("tokens", "tokens", "{:,.0f}"),
    ("final_train_loss", "train loss", "{:.4f}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("learning", "learning", "{:+.4f}"),
    ("forgetting", "forgetting", "{:+.4f}"),
    ("peak_mem_bytes", "peak mem GB", "GB"),
    ("wall_s", "wall s", "{:.0f}"),
)


def _cell(record: dict[str, Any], key: str, fmt: str | None) -> str:
    value = record.get(key)
    if value is None:
        return "-" if key != "status" or not record.get("error") else "corrupt"
    if fmt == "GB":
        return f"{value / 1e9:.2f}"
    if key == "status" and record.get("error"):
        return f"corrupt: {record['error']}"
    text = fmt.format(value) if fmt else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(records)} runs and comparisons")
    for _, title, fmt in COLUMNS:
        table.add_column(title, justify="right" if fmt else "left")
    for r in records:
        table.add_row(*(_cell(r, key, fmt) for key, _, fmt in COLUMNS))
    Console(width=200).print(table)


@click.command("runs", context_settings={"ignore_unknown_options": False})
@click.argument("dirs", nargs=-1, type=click.Path())
@click.option("--method", help="Only runs of this method (full, lora, dora, qlora, ...).")
@click.option("--base", help="Only runs of this base model.")
@click.option("--where", multiple=True, help="Condition FIELD OP VALUE, e.g. 'forgetting<0.05'; repeatable.")
@click.option("--sort", "sort_by", help="Sort by a field (prefix - for descending), e.g. -learning.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs_command(
    dirs: tuple[str, ...],
    method: str | None,
    base: str | None,
    where: tuple[str, ...],
    sort_by: str | None,
    as_json: bool,
) -> None:
    """List run directories and comparisons under DIRS (default: the current directory, recursively).

    `adaptlab runs show RUN` prints one run or comparison in full.
    """
    if dirs and dirs[0] == "show":
        _show(dirs[1:], as_json)
        return
    from adaptlab.runs_index import list_runs

    records = list_runs(list(dirs), method=method, base=base, where=where, sort=sort_by)
    if as_json:
        click.echo(json.dumps(records, indent=2))
    else:
        _table(records)


def _show(args: tuple[str, ...], as_json: bool) -> None:
    from adaptlab.runs_index import show_run

    if len(args) != 1:
        raise click.UsageError("adaptlab runs show RUN: give one run or comparison directory")
    detail = show_run(args[0])
    if as_json:
        click.echo(json.dumps(detail, indent=2))
        return
    for key, value in detail["record"].items():
        if value is not None:
            click.echo(f"{key:>18}: {value}")
    for section in ("summary", "results", "config"):
        if detail.get(section):
            click.echo(f"\n{section}:")
            click.echo(json.dumps(detail[section], indent=2)[:20000])
