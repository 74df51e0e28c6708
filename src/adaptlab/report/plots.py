"""The comparison's plots (PNG, matplotlib Agg): loss curves, learning vs forgetting, study curves.

python -c "from adaptlab.report.plots import loss_curves; help(loss_curves)"
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adaptlab.report.recommend import pareto_frontier

METRIC_LABEL = {
    "general_nll": "forgetting: general NLL increase (nats/token)",
    "drift_kl": "forgetting: drift KL(base || tuned) (nats/token)",
    "mc_acc_drop": "forgetting: MC accuracy drop",
}


def _figure(w: float, h: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def read_curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(tokens, train loss) and (tokens, val loss) from a run's metrics.jsonl."""
    train, val = [], []
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return train, val
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "val_loss" in row and row["val_loss"] is not None:
            val.append((row["tokens"], row["val_loss"]))
        elif "loss" in row:
            train.append((row["tokens"], row["loss"]))
    return train, val


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def loss_curves(results: dict[str, Any], out_dir: Path, path: Path) -> Path:
    """Training loss (smoothed line, raw faint) and validation loss (markers) against tokens, all arms."""
    arms = results["arms"]
    fig, ax = _figure(9, 5)
    for a, c in zip(arms, colors(len(arms)), strict=True):
        if not a.get("runs"):
            continue
        train, val = read_curves(out_dir / a["runs"][0]["dir"])
        if train:
            x, y = zip(*train, strict=True)
            ax.plot(x, y, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(
                x,
                _ema(list(y), 0.3 if len(y) > 10 else 1.0),
                color=c,
                linewidth=1.6,
                label=f"{a['name']} train",
            )
        if val:
            x, y = zip(*val, strict=True)
            ax.plot(
                x,
                y,
                color=c,
                linestyle="--",
                marker="o",
                markersize=4,
                linewidth=1.2,
                label=f"{a['name']} val",
            )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training (solid, smoothed) and validation (dashed) loss")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=7, ncol=2 if len(arms) > 4 else 1, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def learning_forgetting(results: dict[str, Any], path: Path) -> Path:
    """One point per arm with 95% CI error bars; the Pareto frontier joined and ringed."""
    ok = [a for a in results["arms"] if a.get("status") == "ok" and a["forgetting"].get("value") is not None]
    all_names = [a["name"] for a in results["arms"]]
    palette = dict(zip(all_names, colors(len(all_names)), strict=True))
    fig, ax = _figure(8, 5.5)
    front = pareto_frontier([(a["name"], a["learning"]["value"], a["forgetting"]["value"]) for a in ok])
    by = {a["name"]: a for a in ok}
    if len(front) > 1:
        xs = [by[n]["forgetting"]["value"] for n in front]
        ys = [by[n]["learning"]["value"] for n in front]
        ax.plot(xs, ys, color="0.4", linestyle=":", linewidth=1.5, zorder=1, label="Pareto frontier")
    for a in ok:
        x, y = a["forgetting"]["value"], a["learning"]["value"]
        xl, xh = a["forgetting"]["ci95"]
        yl, yh = a["learning"]["ci95"]
        ax.errorbar(
            x,
            y,
            xerr=[[max(x - xl, 0)], [max(xh - x, 0)]],
            yerr=[[max(y - yl, 0)], [max(yh - y, 0)]],
            fmt="o",
            color=palette[a["name"]],
            capsize=3,
            markersize=7,
            zorder=3,
            label=a["name"],
        )
        if a["name"] in front:
            ax.scatter([x], [y], s=230, facecolors="none", edgecolors="black", linewidths=1.3, zorder=4)
        offset = [(7, 6), (7, -12), (-7, 6), (-7, -12)][
            ok.index(a) % 4
        ]  # staggered: close points stay legible
        ax.annotate(
            a["name"],
            (x, y),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            ha="left" if offset[0] > 0 else "right",
        )
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.axvline(0, color="0.7", linewidth=0.8)
    ax.set_xlabel(METRIC_LABEL.get(results.get("forgetting_metric", ""), "forgetting"))
    ax.set_ylabel("learning: base - tuned NLL on held-out target (nats/token)")
    ax.set_title("Learning vs forgetting (95% CIs; ringed: on the Pareto frontier)")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def study_plot(results: dict[str, Any], path: Path) -> Path | None:
    """The study's own view: learning against what it varies (or val loss against LR), per method."""
    study = results.get("study")
    arms = [a for a in results["arms"] if a.get("status") == "ok"]
    if study == "lr":
        swept = [a for a in results["arms"] if a.get("lr_sweep")]
        if not swept:
            return None
        fig, ax = _figure(8, 4.5)
        for a, c in zip(swept, colors(len(swept)), strict=True):
            pts = [p for p in a["lr_sweep"]["points"] if p["final_val_loss"] is not None]
            pts.sort(key=lambda p: p["lr"])
            ax.plot(
                [p["lr"] for p in pts],
                [p["final_val_loss"] for p in pts],
                marker="o",
                color=c,
                label=a["name"],
            )
            best = [p for p in pts if p.get("chosen")]
            if best:
                ax.scatter(
                    [best[0]["lr"]], [best[0]["final_val_loss"]], s=160, facecolors="none", edgecolors=c
                )
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("final validation loss")
        ax.set_title("LR sweep (ringed: best by validation loss)")
    elif study in ("rank", "batch", "data-size", "targets"):
        if not arms:
            return None
        fig, ax = _figure(8, 4.5)
        series: dict[str, list[dict[str, Any]]] = {}
        for a in arms:
            key = (
                a["method"]
                if study != "data-size" or a["method"] == "full"
                else f"{a['method']} r{a['config']['rank']}"
            )
            if study == "rank" and a["method"] == "full":
                continue
            series.setdefault(key, []).append(a)
        if study == "rank":
            for f in (a for a in arms if a["method"] == "full"):
                lo, hi = f["learning"]["ci95"]
                ax.axhspan(lo, hi, color="0.85", label=f"{f['name']} (95% CI)")
                ax.axhline(f["learning"]["value"], color="0.4", linewidth=1)
        for (name, group), c in zip(series.items(), colors(len(series)), strict=True):
            xs = [_x(a, study) for a in group]
            order = sorted(range(len(group)), key=lambda i: xs[i])
            ys = [group[i]["learning"]["value"] for i in order]
            err = [
                [ys[j] - group[i]["learning"]["ci95"][0] for j, i in enumerate(order)],
                [group[i]["learning"]["ci95"][1] - ys[j] for j, i in enumerate(order)],
            ]
            ax.errorbar([xs[i] for i in order], ys, yerr=err, marker="o", capsize=3, color=c, label=name)
        if study in ("rank", "batch", "data-size"):
            ax.set_xscale("log", base=2 if study != "data-size" else 10)
        if study == "targets":
            ax.set_xticks(range(3), ["attention", "mlp", "all-linear"])
        ax.set_xlabel(
            {
                "rank": "LoRA rank",
                "batch": "global batch (sequences)",
                "data-size": "fraction of training documents",
                "targets": "targets",
            }[study]
        )
        ax.set_ylabel("learning (nats/token)")
        ax.set_title(f"{study} study: learning (95% CI)")
    else:
        return None
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _x(a: dict[str, Any], study: str) -> float:
    c = a["config"]
    if study == "rank":
        return float(c.get("rank") or math.nan)
    if study == "batch":
        return float(c["batch"] * c["grad_accum"])
    if study == "data-size":
        return float(c.get("data_fraction") or 1.0)
    return (
        float(["attention", "mlp", "all-linear"].index(c.get("targets")))
        if c.get("targets") in ("attention", "mlp", "all-linear")
        else 0.0
    )


def all_plots(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    out = {
        "loss": loss_curves(results, out_dir, plots / "loss.png"),
        "scatter": learning_forgetting(results, plots / "learning_forgetting.png"),
    }
    study = study_plot(results, plots / "study.png")
    if study is not None:
        out["study"] = study
    return out
