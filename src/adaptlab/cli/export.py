"""`adaptlab export`: a run's model or adapter (or a base model) as GGUF for llama.cpp / Ollama.

adaptlab export runs/full --format gguf --out gguf/full               # model-f16.gguf
adaptlab export runs/lora --format gguf --quant q8_0 --ollama --out gguf/lora
adaptlab export smollm2-135m --out gguf/base --push-to-hub me/smollm2-gguf
"""

from __future__ import annotations

import click

from adaptlab.cli.options import overwrite_option, push_to_hub_option


@click.command("export")
@click.argument("source")
@click.option(
    "--out", required=True, type=click.Path(), help="Output directory (new, or written by adaptlab)."
)
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True)
@click.option("--quant", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True)
@click.option(
    "--ollama", is_flag=True, help="Also write an Ollama Modelfile (an adapter: with its base GGUF)."
)
@click.option("--base", help="Base model of an adapter (default: the one it records).")
@overwrite_option
@push_to_hub_option("the exported files")
def export_command(
    source: str,
    out: str,
    fmt: str,
    quant: str,
    ollama: bool,
    base: str | None,
    overwrite: bool,
    push_to_hub: str | None,
) -> None:
    """Export SOURCE (run dir, adapter, HF model dir or embedded model) as GGUF, checked by reading it back."""
    from adaptlab.export import export
    from adaptlab.publish import check_push

    check_push(push_to_hub)
    report = export(source, out, fmt=fmt, quant=quant, ollama=ollama, base=base, overwrite=overwrite)
    click.echo(
        f"wrote {report.gguf} ({report.kind}, {report.tensors} tensors, {report.bytes / 1e6:.1f} MB, {quant})"
    )
    check = (
        "exact (f16 of the source)" if report.max_abs_err == 0 else f"max |error| {report.max_abs_err:.3g}"
    )
    click.echo(f"read back with gguf: {check}; relative to the largest weight {report.max_rel_err:.3g}")
    if report.base_gguf:
        click.echo(f"wrote {report.base_gguf} (the base, for Ollama)")
    if report.modelfile:
        click.echo(f"wrote {report.modelfile}: ollama create NAME -f {report.modelfile}")
    if push_to_hub:
        from adaptlab.publish import push_export

        click.echo(f"pushed to {push_to_hub}: {push_export(out, push_to_hub)}")
