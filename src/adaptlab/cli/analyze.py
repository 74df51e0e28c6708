"""`adaptlab analyze --tuned RUN [--base M]`: how a LoRA-family adapter or a full fine-tuning changed the weights.

Writes OUT/analysis.json and two heatmaps (intruder counts, relative update norms), prints a table
per module type, or the JSON itself with --json. With --mitigate LAMBDA it writes instead a PEFT
adapter whose intruder directions are scaled by LAMBDA (mitigate.py); with --mitigate sweep it
evaluates a grid of lambdas, learning vs forgetting (mitigate_sweep.py).

    adaptlab analyze --base smollm2-135m --tuned runs/lora --out runs/lora/analysis
    adaptlab analyze --tuned runs/lora --mitigate 0.7            # -> runs/lora/mitigated-0.7/
    adaptlab analyze --tuned runs/lora --mitigate sweep --general ../shared/data/general/wordnet_glosses.jsonl
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adaptlab.cli.options import overwrite_option


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


def _mitigation_out(tuned: str, what: str) -> Path:
    """RUN/<what> for a run directory (or its adapter/), else ./<what>-<name>."""
    from adaptlab.artifacts import resolve

    art = resolve(tuned)
    if art.run_dir is not None:
        return art.run_dir / what
    return Path(f"{what}-{Path(tuned).expanduser().resolve().name}")


def _parse_mitigate(value: str) -> float | str:
    if value == "sweep":
        return value
    try:
        lam = float(value)
    except ValueError:
        raise click.BadParameter(
            "give a number between 0 and 1, or `sweep`", param_hint="--mitigate"
        ) from None
    if not 0.0 <= lam <= 1.0:
        raise click.BadParameter(f"{value} is not between 0 and 1", param_hint="--mitigate")
    return lam


def _print_mitigation(report: dict[str, Any]) -> None:
    t = report["totals"]
    click.echo(
        f"lambda {report['lambda']:g}: {t['intruders']} intruder directions in {t['layers_with_intruders']} of "
        f"{t['layers']} layers scaled; largest relative change of a layer's dW {t['max_rel_change']:.3g}; "
        f"rank mode {report['rank_mode']} (largest rank written {t['max_rank_written']}"
        + (
            f", largest truncation error {t['max_truncation_error']:.3g}"
            if "max_truncation_error" in t
            else ""
        )
        + ")"
    )
    click.echo(f"wrote the adapter to {report['adapter']}")


def _print_sweep(result: dict[str, Any], out: Path) -> None:
    click.echo("lambda  learning  [95% CI]            forgetting  [95% CI]")
    for p in result["points"]:
        lo, hi = p["learning_ci95"]
        flo, fhi = p["forgetting_ci95"]
        click.echo(
            f"{p['lambda']:<6g}  {p['learning']:+.4f}  [{lo:+.4f}, {hi:+.4f}]  "
            f"{p['forgetting']:+.4f}  [{flo:+.4f}, {fhi:+.4f}]"
        )
    metric = result["points"][0]["forgetting_metric"] if result["points"] else ""
    click.echo(f"forgetting is {metric}; wrote {out / 'sweep.json'} and {result['plot']}")


def _mitigate(
    tuned: str, base: str | None, value: float | str, out: str | None, overwrite: bool, **kw: Any
) -> None:
    from adaptlab.outputs import owned

    if value == "sweep":
        from adaptlab.mitigate_sweep import DEFAULT_GRID, parse_grid, sweep

        grid = parse_grid(kw["lambdas"]) if kw["lambdas"] else list(DEFAULT_GRID)
        out_dir = Path(out) if out else _mitigation_out(tuned, "mitigate-sweep")
        with owned(out_dir, "mitigation sweep", overwrite=overwrite):
            result = sweep(
                tuned,
                out_dir,
                base=base,
                lambdas=grid,
                data=kw["data"] or None,
                general=kw["general"] or None,
                k=kw["k"],
                eps=kw["eps"],
                rank_mode=kw["rank_mode"],
                max_docs=kw["eval_docs"],
                say=lambda text: click.echo(text, err=True),
            )
        _print_sweep(result, out_dir)
        return
    from adaptlab.mitigate import mitigate

    out_dir = Path(out) if out else _mitigation_out(tuned, f"mitigated-{value:g}")
    with owned(out_dir, "mitigated adapter", overwrite=overwrite):
        report = mitigate(
            tuned, float(value), out_dir, base=base, k=kw["k"], eps=kw["eps"], rank_mode=kw["rank_mode"]
        )
    _print_mitigation(report)


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
@overwrite_option
@click.option(
    "--mitigate",
    "mitigate_value",
    help="Scale the adapter's intruder directions by LAMBDA (0..1) and write the adapter; `sweep`: a grid.",
)
@click.option(
    "--rank-mode",
    type=click.Choice(["exact", "keep"]),
    default="exact",
    show_default=True,
    help="exact: rank grows by the intruders removed (dW' exact); keep: rank r by truncated SVD (as PEFT).",
)
@click.option("--lambdas", help="Sweep: comma-separated lambdas (default 0,0.25,0.5,0.7,0.85,1).")
@click.option("--data", multiple=True, help="Sweep: target data (default: the run's own test split).")
@click.option("--general", multiple=True, help="Sweep: general text for forgetting (default: drift KL).")
@click.option(
    "--eval-docs", type=click.IntRange(min=1), default=16, show_default=True, help="Sweep: docs scored."
)
def analyze_command(
    tuned: str,
    base: str | None,
    k: int,
    eps: float,
    as_json: bool,
    out: str | None,
    overwrite: bool,
    mitigate_value: str | None,
    **kw: Any,
) -> None:
    """Per-layer weight updates: norms, effective rank, stable rank, intruder dimensions (and mitigation)."""
    from adaptlab.analysis import analyze

    _check_mitigation_flags(click.get_current_context(), mitigate_value)
    if mitigate_value is not None:
        _mitigate(tuned, base, _parse_mitigate(mitigate_value), out, overwrite, k=k, eps=eps, **kw)
        return
    from adaptlab.outputs import owned

    out_dir = Path(out) if out else _default_out(tuned)
    with owned(out_dir, "analysis", overwrite=overwrite):
        result = analyze(base, tuned, k=k, eps=eps, out_dir=out_dir)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        _print_summary(result, out_dir)


SWEEP_ONLY = ("lambdas", "data", "general", "eval_docs")
"""Flags of `--mitigate sweep` alone; `--rank-mode` applies to any `--mitigate`."""


def _check_mitigation_flags(ctx: click.Context, mitigate_value: str | None) -> None:
    """A mitigation flag without the mitigation it shapes is refused in one line, not ignored."""
    from click.core import ParameterSource

    from adaptlab.errors import UserError

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE

    if mitigate_value is None and given("rank_mode"):
        raise UserError(
            "--rank-mode applies to --mitigate: add --mitigate LAMBDA (or sweep) or drop --rank-mode"
        )
    for name in SWEEP_ONLY:
        if given(name) and mitigate_value != "sweep":
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} applies to --mitigate sweep: add it or drop {flag}")
