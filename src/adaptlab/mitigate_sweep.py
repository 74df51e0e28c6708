"""`analyze --mitigate sweep`: learning vs forgetting of a LoRA adapter over a grid of lambdas.

For each lambda the mitigated adapter is written (mitigate.py) to OUT/lambda-<x>/ and evaluated
with evaluate/: learning = base NLL - tuned NLL on held-out target text (the run's own test split
by default), forgetting = tuned NLL - base NLL on general text when given, else drift, KL(base ||
tuned), on text the base samples from the shipped general prompts. Base figures are computed once
(evaluate's on-disk cache). OUT/sweep.json holds every point with its paired-bootstrap CI, and
OUT/sweep.png the curve (forgetting against learning, one labelled point per lambda).

    adaptlab analyze --tuned runs/lora --mitigate sweep --general ../shared/data/general/wordnet_glosses.jsonl
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptlab.analysis import DEFAULT_EPS, DEFAULT_K
from adaptlab.artifacts import resolve
from adaptlab.errors import UserError
from adaptlab.mitigate import mitigate

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)


def parse_grid(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; each value in [0, 1]."""
    try:
        grid = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--lambdas {text!r}: give comma-separated numbers between 0 and 1") from None
    if not grid or grid[0] < 0 or grid[-1] > 1:
        raise UserError(f"--lambdas {text!r}: give comma-separated numbers between 0 and 1")
    return grid


def target_docs(tuned: str | Path, data: Sequence[str] | None, max_docs: int, max_chars: int) -> list[Any]:
    """Held-out target documents: the test split of `data`, or of the data the run trained on."""
    from adaptlab.data.corpus import split_documents
    from adaptlab.data.sources import Document, load_documents

    art = resolve(tuned)
    val_frac, test_frac, field = 0.05, 0.05, "text"
    if not data:
        if art.run_dir is None or not (art.run_dir / "config.yaml").exists():
            raise UserError(f"{tuned} is not a run directory: pass the target data with --data")
        cfg = yaml.safe_load((art.run_dir / "config.yaml").read_text())["data"]
        data, field = cfg["train"], cfg.get("text_field", "text")
        val_frac, test_frac = cfg.get("val_frac", val_frac), cfg.get("test_frac", test_frac)
    docs = split_documents(load_documents(list(data), field), "test", val_frac, test_frac)[:max_docs]
    return [d if d.is_chat else Document(id=d.id, text=d.text[:max_chars]) for d in docs]


def _point(lam: float, ev: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    target = ev["target"]["delta"]
    point: dict[str, Any] = {
        "lambda": lam,
        "learning": -target["nll"],
        "learning_ci95": [-target["ci95"][1], -target["ci95"][0]],
        "intruders": report["totals"]["intruders"],
        "max_rel_change": report["totals"]["max_rel_change"],
        "adapter": report["adapter"],
    }
    if "general" in ev:
        point["forgetting"] = ev["general"]["delta"]["nll"]
        point["forgetting_ci95"] = ev["general"]["delta"]["ci95"]
        point["forgetting_metric"] = "general_nll"
    else:
        point["forgetting"] = ev["drift"]["kl"]
        point["forgetting_ci95"] = ev["drift"]["ci95"]
        point["forgetting_metric"] = "drift_kl"
    return point


def sweep(
    tuned: str | Path,
    out: str | Path,
    base: str | None = None,
    lambdas: Sequence[float] = DEFAULT_GRID,
    data: Sequence[str] | None = None,
    general: Sequence[str] | None = None,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
    rank_mode: str = "exact",
    max_docs: int = 16,
    max_chars: int = 4000,
    seq_len: int = 256,
    drift_prompts: int = 16,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Mitigate and evaluate at every lambda; write OUT/sweep.json and OUT/sweep.png; return the sweep."""
    from adaptlab.artifacts import load_tuned
    from adaptlab.data.sources import load_documents
    from adaptlab.evaluate import evaluate
    from adaptlab.evaluate.cache import BaseCache, model_identity
    from adaptlab.evaluate.prompts import GENERAL_PROMPTS

    say = say or (lambda text: None)
    out = Path(out)
    targets = target_docs(tuned, data, max_docs, max_chars)
    if not targets:
        raise UserError("the target data has no held-out test documents: pass more data with --data")
    general_docs = None
    if general:
        general_docs = [d.text[:max_chars] for d in load_documents(list(general))[:max_docs]]
    step = max(1, len(GENERAL_PROMPTS) // drift_prompts)
    prompts = list(GENERAL_PROMPTS)[::step][:drift_prompts]
    points = []
    for lam in lambdas:
        say(f"lambda {lam:g}: mitigating and evaluating")
        report = mitigate(tuned, lam, out / f"lambda-{lam:g}", base=base, k=k, eps=eps, rank_mode=rank_mode)
        tuned_model, _ = load_tuned(report["adapter"], base or resolve(tuned).base_model)
        inner = tuned_model.model.get_base_model()
        ev = evaluate(
            tuned_model.model,
            tuned_model.tokenizer,
            target_docs=targets,
            general_docs=general_docs,
            drift_kl=general_docs is None,
            drift_prompts=prompts,
            seq_len=seq_len,
            cache=BaseCache(),
            base_identity=model_identity(tuned_model.spec, tuned_model.path, inner),
        )
        points.append(_point(lam, ev, report))
        del tuned_model, inner
        gc.collect()
    result = {
        "tuned": str(resolve(tuned).path),
        "k": k,
        "eps": eps,
        "rank_mode": rank_mode,
        "target_docs": len(targets),
        "points": points,
    }
    result["plot"] = str(plot(result, out / "sweep.png"))
    (out / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """Forgetting against learning, one labelled point per lambda, with 95% CIs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = result["points"]
    fig = Figure(figsize=(5.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = [p["learning"] for p in pts], [p["forgetting"] for p in pts]
    xerr = [
        [x - p["learning_ci95"][0] for x, p in zip(xs, pts)],
        [p["learning_ci95"][1] - x for x, p in zip(xs, pts)],
    ]
    yerr = [
        [max(0.0, y - p["forgetting_ci95"][0]) for y, p in zip(ys, pts)],
        [max(0.0, p["forgetting_ci95"][1] - y) for y, p in zip(ys, pts)],
    ]
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="o-", capsize=3)
    for x, y, p in zip(xs, ys, pts):
        ax.annotate(f"λ={p['lambda']:g}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    metric = pts[0]["forgetting_metric"] if pts else "forgetting"
    ax.set_xlabel("learning (target NLL gain, nats/token)")
    ax.set_ylabel("forgetting (" + ("general NLL increase" if metric == "general_nll" else "drift KL") + ")")
    ax.set_title("intruder mitigation: learning vs forgetting", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
