"""`adaptlab model save NAME DIR`: write any model spec as a plain HF directory (safetensors)."""

from __future__ import annotations

import click


@click.group("model")
def model_command() -> None:
    """Work with base models (embedded names, local directories, hub ids)."""


@model_command.command("save")
@click.argument("name")
@click.argument("out", type=click.Path())
def save(name: str, out: str) -> None:
    """Save model NAME (embedded name, local dir or hub id) to OUT as a plain HF directory."""
    from pathlib import Path

    from adaptlab.models import save_model
    from adaptlab.outputs import not_a_file

    not_a_file(Path(out))
    path = save_model(name, out)
    click.echo(f"saved {name} to {path}")
