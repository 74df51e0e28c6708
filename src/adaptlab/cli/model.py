"""`adaptlab model save NAME DIR`: write any model spec as a plain HF directory (safetensors)."""

from __future__ import annotations

import click

from adaptlab.cli.options import overwrite_option


@click.group("model")
def model_command() -> None:
    """Work with base models (embedded names, local directories, hub ids)."""


@model_command.command("save")
@click.argument("name")
@click.argument("out", type=click.Path())
@overwrite_option
def save(name: str, out: str, overwrite: bool) -> None:
    """Save model NAME (embedded name, local dir or hub id) to OUT as a plain HF directory."""
    from adaptlab.models import save_model

    path = save_model(name, out, overwrite=overwrite)
    click.echo(f"saved {name} to {path}")
