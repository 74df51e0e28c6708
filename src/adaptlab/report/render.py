"""The comparison report: OUT/report.md (images beside it) and a self-contained OUT/report.html.

Both are rendered from results.json by jinja2 templates (templates.py); the HTML embeds every
image as base64 PNG, so it opens anywhere, offline, as one file.

    python -c "import json; from pathlib import Path; from adaptlab.report.render import write_report; \\
write_report(json.loads(Path('OUT/results.json').read_text()), Path('OUT'))"
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from adaptlab.report.paired import fmt_diff, resolve
from adaptlab.report.plots import METRIC_LABEL, all_plots
from adaptlab.report.templates import HTML, MARKDOWN

MEASURES = {"general_nll": "general NLL increase", "drift_kl": "drift KL"}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_params(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def fmt_ci(f: dict[str, Any] | None, digits: int = 4) -> str:
    if not f or f.get("value") is None:
        return "n/a"
    lo, hi = f["ci95"]
    return f"{f['value']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _describe_arm(a: dict[str, Any]) -> str:
    c = a["config"]
    if c.get("method") == "full":
        parts = ["full"]
    else:
        t = c.get("targets")
        parts = [
            c.get("method", a["method"]),
            f"r={c.get('rank')}",
            t if isinstance(t, str) else ",".join(t or []),
        ]
        if c.get("rslora"):
            parts.append("rsLoRA")
    lr = c.get("lr")
    parts.append(f"lr {lr:.2g} ({c.get('lr_source')})" if lr else "lr n/a")
    parts.append(f"batch {c['batch']}x{c['grad_accum']}")
    if c.get("data_fraction") is not None:
        parts.append(f"{100 * c['data_fraction']:g}% of data")
    return ", ".join(parts)


def _columns(results: dict[str, Any], ok: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metric, header) of the forgetting measures besides the primary one that some arm measured."""
    metric = results.get("forgetting_metric", "drift_kl")
    primary = resolve("forgetting", metric, ok[0]) if ok else metric
    cols = []
    for m, label in MEASURES.items():
        key = {"general_nll": "general_nll", "drift_kl": "drift"}[m]
        if m != primary and any((a["forgetting"].get(key) or {}).get("value") is not None for a in ok):
            cols.append((m, label))
    stems = sorted({k for a in ok for k in (a["forgetting"].get("mc") or {})})
    cols += [(f"mc:{k}", f"{k} accuracy drop") for k in stems if f"mc:{k}" != primary]
    return cols


def _other(f: dict[str, Any], metric: str) -> dict[str, Any] | None:
    if metric.startswith("mc:"):
        return (f.get("mc") or {}).get(metric[3:])
    return f.get({"general_nll": "general_nll", "drift_kl": "drift"}[metric])


def fmt_fit(entry: dict[str, Any] | None) -> str:
    """An extrapolated figure with its interval, or why there is none."""
    if not entry:
        return "n/a"
    if entry.get("expected") is None:
        return entry.get("note", "n/a")
    lo, hi = entry["ci95"]
    return f"{entry['expected']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _noisy(c: dict[str, Any]) -> str:
    if c.get("noisy_machine"):
        return f"noisy (step-time cv {c.get('step_time_cv', 0):.2f}): times are the machine's"
    return "" if c.get("noisy_machine") is None else "steady"


def _comparison_row(
    a: dict[str, Any], rec: dict[str, Any], vs_pick: dict[str, Any], others: list[tuple[str, str]]
) -> dict[str, Any]:
    """The arm's line in the main table: learning, forgetting, its difference from the pick."""
    f = a["forgetting"]
    d = vs_pick.get(a["name"], {})
    is_pick = a["name"] == rec.get("pick")
    return {
        "name": a["name"],
        "d_learning": "pick" if is_pick else fmt_diff(d.get("learning")),
        "d_forgetting": "pick" if is_pick else fmt_diff(d.get("forgetting")),
        "learning": fmt_ci(a["learning"]),
        "forgetting": fmt_ci(f),
        "others": [fmt_ci(_other(f, m)) for m, _ in others],
        "frontier": "yes" if a["name"] in set(rec.get("frontier", [])) else "",
        "pick": is_pick,
    }


def _arm_row(a: dict[str, Any]) -> dict[str, Any]:
    """The arm's settings, final validation loss, target KL and seed spread."""
    tkl = a.get("target_kl") or {}
    return {
        "name": a["name"],
        "desc": _describe_arm(a),
        "val_loss": f"{a['final_val_loss']:.4f}" if a.get("final_val_loss") is not None else "n/a",
        "target_kl": (
            f"{tkl['base_tuned']:.4f} / {tkl['tuned_base']:.4f}"
            if tkl.get("base_tuned") is not None
            else "n/a"
        ),
        "seeds": (
            f"{a['learning']['spread']['n']} seeds, sd {a['learning']['spread']['std']:.4f}"
            if a["learning"].get("spread")
            else "1"
        ),
    }


def _cost_row(a: dict[str, Any]) -> dict[str, Any]:
    """What the arm cost: parameters, memory, time, throughput, artifact size."""
    c = a["cost"]
    return {
        "name": a["name"],
        "trainable": fmt_params(c["trainable_params"]),
        "fraction": f"{100 * c['trainable_params'] / c['total_params']:.2f}%"
        if c.get("total_params")
        else "n/a",
        "peak_mem": fmt_bytes(c["peak_mem_bytes"]),
        "wall": fmt_s(c["wall_s"]),
        "tps": f"{c['tokens_per_s']:,.0f}",
        "artifact": fmt_bytes(c["artifact_bytes"]),
        "tokens": f"{c['tokens_seen']:,}",
        "machine": _noisy(c),
    }


def _intruder_row(name: str, an: dict[str, Any]) -> dict[str, Any]:
    """The arm's weight-update analysis: intruder dimensions, update norm, effective rank."""
    return {
        "name": name,
        "layers": an["layers"],
        "intruders": an["intruders"],
        "with": an["layers_with_intruders"],
        "per_layer": f"{an['intruders_per_layer']:.2f}"
        if an.get("intruders_per_layer") is not None
        else "n/a",
        "rel": f"{an['rel_update_norm']:.4f}" if an.get("rel_update_norm") is not None else "n/a",
        "erank": f"{an['mean_effective_rank']:.1f}" if an.get("mean_effective_rank") is not None else "n/a",
        "by_type": ", ".join(f"{k} {v['intruders']}" for k, v in (an.get("by_module_type") or {}).items()),
    }


def _heatmap_rows(name: str, an: dict[str, Any], images: dict[str, str]) -> list[dict[str, Any]]:
    """The arm's heatmaps that have an image to show."""
    return [
        {"arm": name, "path": h, "src": images[f"heatmap:{h}"], "kind": Path(h).stem.replace("_", " ")}
        for h in an.get("heatmaps", [])
        if f"heatmap:{h}" in images
    ]


def _sweep_rows(a: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per learning rate the arm's LR sweep tried."""
    if not a.get("lr_sweep"):
        return []
    return [
        {
            "arm": a["name"],
            "lr": f"{p['lr']:.2g}",
            "val": f"{p['final_val_loss']:.4f}" if p.get("final_val_loss") is not None else p.get("status"),
            "chosen": ", ".join(
                x for x, on in (("best", p.get("chosen")), ("beyond the grid", p.get("beyond_grid"))) if on
            ),
        }
        for p in a["lr_sweep"]["points"]
    ]


def context(results: dict[str, Any], images: dict[str, str]) -> dict[str, Any]:
    """Everything the templates show, formatted."""
    rec = results.get("recommendation") or {}
    ok = [a for a in results["arms"] if a.get("status") == "ok"]
    others = _columns(results, ok)
    vs_pick = {row["arm"]: row for row in rec.get("vs_pick", [])}
    failed = [
        {"name": a["name"], "error": a.get("error", "")} for a in results["arms"] if a.get("status") != "ok"
    ]
    analysed = [(a["name"], a["analysis"]) for a in ok if a.get("analysis")]
    cost = [_cost_row(a) for a in ok]
    first_an = next((a["analysis"] for a in results["arms"] if a.get("analysis")), None)
    return {
        "r": results,
        "rec": rec,
        "rows": [_comparison_row(a, rec, vs_pick, others) for a in ok],
        "others": [label for _, label in others],
        "arms": [_arm_row(a) for a in ok],
        "any_paired": any((row.get("learning") or {}).get("paired") for row in rec.get("vs_pick", [])),
        "noisy": [x["name"] for x in cost if x["machine"].startswith("noisy")],
        "predictor": results.get("kl_predictor"),
        "extrapolation": results.get("extrapolation"),
        "cost": cost,
        "intr": [_intruder_row(name, an) for name, an in analysed],
        "failed": failed,
        "heatmaps": [h for name, an in analysed for h in _heatmap_rows(name, an, images)],
        "sweeps": [s for a in ok for s in _sweep_rows(a)],
        "images": {"study": None, **images},
        "metric_label": METRIC_LABEL.get(results.get("forgetting_metric", ""), "forgetting"),
        "k": first_an.get("k") if first_an else None,
        "eps": first_an.get("eps") if first_an else None,
        "summary_lines": (rec.get("summary") or "").splitlines(),
        "fmt_bytes": fmt_bytes,
        "fmt_fit": fmt_fit,
    }


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Plots, report.md and report.html in out_dir; returns their paths."""
    import jinja2

    out = Path(out_dir)
    plots = all_plots(results, out)
    heat = {
        f"heatmap:{h}": out / h
        for a in results["arms"]
        for h in ((a.get("analysis") or {}).get("heatmaps") or [])
    }
    heat = {k: p for k, p in heat.items() if p.exists()}
    md_images = {k: os.path.relpath(p, out) for k, p in {**plots, **heat}.items()}
    html_images = {k: _data_uri(p) for k, p in {**plots, **heat}.items()}
    env = jinja2.Environment(
        autoescape=False, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    md = env.from_string(MARKDOWN).render(**context(results, md_images))
    html_env = jinja2.Environment(
        autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    html = html_env.from_string(HTML).render(**context(results, html_images))
    paths = {"md": out / "report.md", "html": out / "report.html"}
    for key, text in (("md", md), ("html", html)):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    return {**paths, **{f"plot_{k}": v for k, v in plots.items()}}
