"""Studies that need a second data set: regime (CPT vs IFT) and continual (domain A, then domain B).

regime: the comparison's data is a domain as raw text (continued pre-training, CPT); study_data is
the same domain as instruction pairs (instruction fine-tuning, IFT). Full and LoRA train on each at
a small and a large budget (a quarter of the budget, and the budget). Every arm is measured on the
raw text's held-out split (learning); IFT arms also on the instruction pairs' held-out split
(own_learning). results.json gets a `regime` table: per regime and budget, full's and LoRA's
learning on that regime's own held-out text and the gap full - LoRA.

continual: the comparison's data is domain A, study_data domain B. full-a and lora-a train on A;
full-a-then-b and lora-a-then-b continue them on B (`init_from`, train --init-from); lora-b trains
a separate adapter on B. The A adapter and the B adapter are also combined into one (peft's
add_weighted_adapter, `cat` with weights 1 and 1: the sum of both updates) and swapped (A's adapter
for A, B's for B). results.json gets a `continual` table: per method its learning on A before and
after B (what it kept), and its learning on B.

Differences of two arms' figures carry an approximate 95% interval, the half-widths of the two
paired-bootstrap intervals added in quadrature (the arms are scored on the same documents, so this
is conservative).

    adaptlab compare --model tiny-random --data A.jsonl --study continual --study-data B.jsonl --tokens 4096 --out cmp
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

from adaptlab.compare.arms import BUDGETS, COMBINED
from adaptlab.compare.spec import CompareSpec

# ------------------------------------------------------------------------------------------ measuring


def own_spec(spec: CompareSpec, data: list[str]) -> CompareSpec:
    """The spec measuring an arm's own data alone: its held-out split as target, no general probe."""
    return spec.model_copy(
        update={
            "data": spec.data.model_copy(update={"train": list(data)}),
            "general": [],
            "drift": False,
            "mc": [],
        }
    )


def evaluate_own(spec: CompareSpec, run_dir: Path, data: list[str], emit: Any) -> dict[str, Any]:
    """Learning of a run on its own data's held-out split (cached in RUN/eval-own.json)."""
    from adaptlab.compare.evaluation import evaluate_run, load_probes

    own = own_spec(spec, data)
    return evaluate_run(own, run_dir, load_probes(own), emit, name="eval-own.json")


def _diff(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """a - b with the approximate 95% interval (half-widths in quadrature)."""
    if a is None or b is None:
        return None
    half = math.hypot((a["ci95"][1] - a["ci95"][0]) / 2, (b["ci95"][1] - b["ci95"][0]) / 2)
    value = a["value"] - b["value"]
    return {"value": value, "ci95": [value - half, value + half]}


def _fig(f: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if f is None else {"value": f["value"], "ci95": list(f["ci95"])}


def study_results(spec: CompareSpec, out: Path, results: dict[str, Any], emit: Any) -> dict[str, Any] | None:
    """The study's own table for results.json (regime, continual), or None for other studies."""
    if spec.study == "regime":
        return regime_table(results)
    if spec.study == "continual":
        return continual_table(spec, out, results, emit)
    return None


def _ok(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in results["arms"] if a.get("status") == "ok"}


def regime_table(results: dict[str, Any]) -> dict[str, Any]:
    """Per regime and budget: full's and LoRA's learning on that regime's held-out text, and the gap."""
    arms = _ok(results)
    rows = []
    for budget, _ in BUDGETS:
        for regime in ("cpt", "ift"):
            key = "learning" if regime == "cpt" else "own_learning"
            full = arms.get(f"{regime}-full-{budget}", {}).get(key)
            lora = arms.get(f"{regime}-lora-{budget}", {}).get(key)
            tokens = arms.get(f"{regime}-full-{budget}", {}).get("config", {}).get("tokens")
            rows.append(
                {
                    "regime": regime,
                    "budget": budget,
                    "tokens": tokens,
                    "measured_on": "raw text held out" if regime == "cpt" else "instruction pairs held out",
                    "full": _fig(full),
                    "lora": _fig(lora),
                    "full_minus_lora": _diff(full, lora),
                }
            )
    return {"rows": rows, "note": "learning in nats/token; intervals of differences are approximate"}


def continual_table(spec: CompareSpec, out: Path, results: dict[str, Any], emit: Any) -> dict[str, Any]:
    """What full and LoRA keep of A after B, next to a separate B adapter combined with or swapped for A's."""
    arms = _ok(results)
    rows = []
    for method in ("full", "lora"):
        a, ab = arms.get(f"{method}-a"), arms.get(f"{method}-a-then-b")
        before = a and a.get("learning")
        after = ab and ab.get("learning")
        rows.append(
            {
                "method": method,
                "how": "A then B (init_from)",
                "a_before": _fig(before),
                "a_after": _fig(after),
                "a_kept": _diff(after, before),
                "a_kept_fraction": after["value"] / before["value"]
                if before and after and before["value"]
                else None,
                "b": _fig(ab and ab.get("own_learning")),
                "forgetting": _fig(ab and ab.get("forgetting")),
            }
        )
    lora_a, lora_b = arms.get("lora-a"), arms.get("lora-b")
    if lora_a and lora_b:
        rows.append(
            {
                "method": "lora",
                "how": "swapped (A's adapter on A, B's on B)",
                "a_before": _fig(lora_a["learning"]),
                "a_after": _fig(lora_a["learning"]),
                "a_kept": {"value": 0.0, "ci95": [0.0, 0.0]},
                "a_kept_fraction": 1.0,
                "b": _fig(lora_b.get("own_learning")),
                "forgetting": None,
            }
        )
        combined = _combined(spec, out, results, emit)
        if combined is not None:
            rows.append(
                {
                    "method": "lora",
                    "how": "combined (A's + B's adapter, peft cat)",
                    "a_before": _fig(lora_a["learning"]),
                    "a_after": combined["a"],
                    "a_kept": _diff(combined["a"], lora_a["learning"]),
                    "a_kept_fraction": combined["a"]["value"] / lora_a["learning"]["value"]
                    if lora_a["learning"]["value"]
                    else None,
                    "b": combined["b"],
                    "forgetting": None,
                    "adapter": combined["adapter"],
                }
            )
    return {"rows": rows, "note": "learning on A / B in nats/token (base NLL - tuned NLL on held-out text)"}


def _combined(spec: CompareSpec, out: Path, results: dict[str, Any], emit: Any) -> dict[str, Any] | None:
    """Combine lora-a's and lora-b's adapters (seed 0 runs) and score it on A and on B (cached)."""
    from adaptlab.adapters import combine_adapters
    from adaptlab.errors import UserError

    arms = _ok(results)
    runs = [out / arms[n]["runs"][0]["dir"] for n in ("lora-a", "lora-b")]
    target = out / "combined" / COMBINED
    cache = out / "combined" / f"{COMBINED}.eval.json"
    stamp = [(r / "summary.json").stat().st_mtime_ns for r in runs]
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["result"]
    emit({"event": "eval_start", "run": COMBINED})
    if target.exists():
        shutil.rmtree(target)  # an older combination inside this comparison's own output
    try:
        combine_adapters(runs, target, spec.model, weights=[1.0, 1.0], how="cat")
        result = {
            "adapter": str(target.relative_to(out)),
            "a": _score(spec, target, spec.data.train),
            "b": _score(spec, target, spec.study_data),
        }
    except UserError as err:
        emit({"event": "eval_failed", "run": COMBINED, "error": str(err)})
        return None
    cache.write_text(json.dumps({"stamp": stamp, "result": result}, indent=1) + "\n")
    return result


def _score(spec: CompareSpec, adapter: Path, data: list[str]) -> dict[str, Any]:
    from adaptlab.artifacts import load_tuned
    from adaptlab.compare.evaluation import load_probes
    from adaptlab.compare.results import learning_of
    from adaptlab.evaluate import evaluate
    from adaptlab.evaluate.cache import BaseCache, model_identity

    probes = load_probes(own_spec(spec, data))
    tuned, _ = load_tuned(adapter, spec.model)
    ev = evaluate(
        tuned.model,
        tuned.tokenizer,
        target_docs=probes.target,
        seq_len=spec.eval.seq_len,
        batch_size=spec.eval.batch,
        cache=BaseCache(),
        base_identity=model_identity(spec.model, tuned.path, tuned.model.get_base_model()),
    )
    return _fig(learning_of(ev))  # type: ignore[return-value]
