"""`adaptlab analyze --tuned RUN [--base M]`: how a LoRA-family adapter or a full fine-tuning changed the weights.

Writes OUT/analysis.json and two heatmaps (intruder counts, relative update norms), prints a table
per module type, or the JSON itself with --json.

    adaptlab analyze --base smollm2-135m --tuned runs/lora --out runs/lora/analysis
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _default_out(tuned: str) -> Path:
    """RUN/analysis for a run directory (or its adapter/ or model/), else ./analysis-<name>."""
    from adaptlab.artifacts import resolve

    art = resolve(tuned)
    if art.run_dir is not None:
        return art.run_dir / "analysis"
    return Path(f"analysis-{Path(tuned).expanduser().resolve().name}")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _print_summary(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    totals = result["totals"]
    table = Table(
        title=f"{result['method']}: {totals['layers']} layers (intruders: k={result['k']}, eps={result['eps']:g})",
        title_justify="left",
    )
    for col in ("module", "layers", "intruders", "w/ intr.", "rel dW", "eff rank", "stable rk"):
        table.add_column(col, justify="left" if col == "module" else "right")
    rows = list(totals["by_module_type"].items()) + [("all", totals)]
    for name, agg in rows:
        table.add_row(
            name,
            str(agg["layers"]),
            str(agg["intruders"]),
            str(agg["layers_with_intruders"]),
            _fmt(agg["rel_update_norm"]),
            _fmt(agg["mean_effective_rank"]),
            _fmt(agg["mean_stable_rank"]),
            end_section=name == rows[-2][0],
        )
    console = Console(highlight=False)
    console.print(table)
    depth = " ".join(f"{d}:{agg['intruders']}" for d, agg in totals["by_layer"].items())
    sweep = " ".join(f"{e}:{s['intruders']}" for e, s in result["eps_sweep"].items())
    console.print(f"intruders by layer  {depth}")
    console.print(f"eps sweep           {sweep}")
    console.print(f"note: {result['base_note']}")
    console.print(f"wrote {out / 'analysis.json'} and {', '.join(Path(p).name for p in result['heatmaps'])}")


@click.command("analyze")
@click.option("--tuned", required=True, help="Run directory, PEFT adapter directory or HF model directory.")
@click.option(
    "--base", default=None, help="Base model (embedded name, HF dir, hub id). Default: the run's base."
)
@click.option(
    "--k", type=click.IntRange(min=1), default=10, show_default=True, help="Top singular vectors checked."
)
@click.option(
    "--eps",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Intruder if the largest |cos| with any base singular vector is below this.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result to stdout instead of a table.")
@click.option("--out", type=click.Path(), default=None, help="Output folder. Default: RUN/analysis.")
@click.option(
    "--overwrite", is_flag=True, help="Write into an existing --out, replacing only adaptlab's outputs."
)
def analyze_command(
    tuned: str, base: str | None, k: int, eps: float, as_json: bool, out: str | None, overwrite: bool
) -> None:
    """Per-layer weight updates: norms, effective rank, stable rank, intruder dimensions."""
    from adaptlab.analysis import analyze
    from adaptlab.outputs import owned

    out_dir = Path(out) if out else _default_out(tuned)
    with owned(out_dir, "analysis", overwrite=overwrite):
        result = analyze(base, tuned, k=k, eps=eps, out_dir=out_dir)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_summary(result, out_dir)
