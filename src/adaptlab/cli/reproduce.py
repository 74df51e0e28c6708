"""`adaptlab reproduce`: run the studies behind the published findings and write docs/findings.md.

adaptlab reproduce --data-root ../shared/data --out repro --dry-run     # the comparisons and the time estimate
adaptlab reproduce --data-root ../shared/data --out repro               # run (resumable), then write the findings
adaptlab reproduce --data-root ../shared/data --out repro --studies methods,healed --domains legal
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adaptlab.cli.options import overwrite_option
from adaptlab.config import COMPARE_SEEDS, EVAL_DOCS


def _split(text: str | None) -> tuple[str, ...] | None:
    return tuple(x.strip() for x in text.split(",") if x.strip()) if text else None


@click.command("reproduce")
@click.option(
    "--data-root", required=True, type=click.Path(), help="Folder laid out as DATA.md's shared data."
)
@click.option(
    "--out", required=True, type=click.Path(), help="Output folder: one comparison per study and domain."
)
@click.option(
    "--model", default="smollm2-135m", show_default=True, help="Base model (healed: <model>-healed)."
)
@click.option(
    "--studies",
    help="Comma list (default all): methods,lr,targets,batch,rank,data-size,regime,continual,healed,rl.",
)
@click.option("--domains", help="Comma list of shipped domains (default legal,systems).")
@click.option("--tokens", type=int, default=8192, show_default=True, help="Budget per arm in tokens.")
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=COMPARE_SEEDS,
    show_default=True,
    help="Replicates per arm of every comparison, the rl study's included (1: unreplicated).",
)
@click.option(
    "--eval-docs",
    type=click.IntRange(min=1),
    default=EVAL_DOCS,
    show_default=True,
    help="Held-out target documents per domain, and general-probe documents, scored per comparison.",
)
@click.option(
    "--findings", type=click.Path(), default="docs/findings.md", show_default=True, help="Markdown to write."
)
@click.option(
    "--evidence",
    type=click.Path(file_okay=False),
    default="docs/findings",
    show_default=True,
    help="Each comparison's results.json and settings, kept as it finishes (commit them); a comparison kept "
    "with the same settings is reused, and --judge-only judges what is kept.",
)
@click.option(
    "--judge-only",
    is_flag=True,
    help="Train nothing: judge what --evidence (else OUT) holds, write --findings.",
)
@overwrite_option
@click.option(
    "--dry-run",
    is_flag=True,
    help="List the comparisons and the estimated time on a 2-core CPU; train nothing.",
)
def reproduce_command(
    data_root: str,
    out: str,
    model: str,
    studies: str | None,
    domains: str | None,
    tokens: int,
    seeds: int,
    eval_docs: int,
    findings: str,
    evidence: str,
    judge_only: bool,
    overwrite: bool,
    dry_run: bool,
) -> None:
    """Test the LoRA-vs-full findings on the embedded model; verdicts with numbers and CIs."""
    from adaptlab import reproduce as rep
    from adaptlab.cli.compare import Printer, stop_on_sigterm
    from adaptlab.models import quiet_transformers

    rep.check_findings_path(findings)  # before hours of training, not after
    comparisons = rep.plan(
        data_root,
        model=model,
        scale=rep.Scale(tokens=tokens, seeds=seeds, eval_docs=eval_docs),
        studies=_split(studies) or rep.STUDIES,
        domains=_split(domains) or tuple(rep.DOMAINS),
    )
    estimate = rep.estimate_s(comparisons)
    for c in comparisons:
        click.echo(f"{c.key}")
    click.echo(f"{len(comparisons)} comparisons; estimated {estimate / 3600:.1f} h on a 2-core CPU")
    if dry_run:
        return
    quiet_transformers()
    printer = Printer()

    def on_event(e: dict[str, Any]) -> None:
        if e["event"] == "comparison":
            printer.echo(f"comparison {e['key']}")
        elif e["event"] == "message":
            printer.echo(e["text"])
        printer(e)

    with stop_on_sigterm():
        data = rep.run(
            comparisons, out, on_event=on_event, judge_only=judge_only, overwrite=overwrite, evidence=evidence
        )
    path = rep.write_findings(data, findings)
    counts: dict[str, int] = {}
    for f in data["findings"]:
        counts[f["overall"]] = counts.get(f["overall"], 0) + 1
    click.echo(
        ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        + f"; wrote {Path(out) / 'findings.json'} and {path}"
    )
