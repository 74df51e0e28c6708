"""results.json: per arm its config, cost meter, learning and forgetting (with 95% CIs) and analysis.

Schema (nats per token throughout; ci95 = [lo, hi]):

    {"version": 1, "study", "model", "data", "budget_tokens", "budget_note", "lr_rule", "seeds",
     "forgetting_metric": "general_nll" | "drift_kl" | "mc_acc_drop", "notes": [...],
     ("seeds": replicates per arm; 1 means every difference is unreplicated)
     "arms": [{"name", "method", "status": "ok" | "failed", "error"?, "label",
               "config": {method, rank, alpha, rslora, targets, lr, lr_source, batch, grad_accum,
                          seq_len, steps, tokens, data_fraction, data, init_from},
               "runs": [{"run", "dir", "seed"}], "seeds": replicates (1: unreplicated),
               "per_seed"?: [{"run", "seed", "learning", "forgetting"}] (with more than one seed),
               "learning": {"value", "ci95", "base_nll", "tuned_nll", "tokens", "docs", "spread"?},
               "own_learning"?: {as learning, on the held-out split of the arm's own data},
               "forgetting": {"metric", "value", "ci95", "general_nll"?: {...}, "drift"?: {...},
                              "mc"?: {stem: {"value", "ci95", "base_acc", "acc"}}},
               "cost": {"trainable_params", "total_params", "peak_mem_bytes", "wall_s",
                        "tokens_per_s", "artifact_bytes", "tokens_seen"},
               "final_train_loss", "final_val_loss",
               "per_doc": {"target": {"tokens", "base_nll", "nll": [per seed]}, "general"?: {...},
                           "drift"?: {"kl": [per seed], "tokens": [per seed]},
                           "target_kl"?: {"kl", "kl_reverse", "tokens": [per seed]},
                           "mc"?: {stem: {"base_acc", "acc": [per seed]}}} | null,
               "target_kl": {"base_tuned", "tuned_base"} | null,
               "analysis": {"layers", "intruders", "layers_with_intruders", "intruders_per_layer",
                            "rel_update_norm", "mean_effective_rank", "mean_stable_rank",
                            "by_module_type", "heatmaps": [paths relative to OUT]} | null,
               "lr_sweep": {"points": [{"lr", "run", "final_val_loss", "chosen"}], "best_lr",
                            "per_seed"?: [{"seed_index", "points"}] (swept at every seed)} | null,
               "lr_optimum"?: {"per_seed", "per_seed_edge", "fitted", "edge"} (lr study)}],
     "kl_predictor": {see adaptlab.report.predictor}, "extrapolation": {see adaptlab.report.extrapolate} | null,
     "recommendation": {see adaptlab.report.recommend},
     "regime"? | "continual"?: {"rows": [...]} (see adaptlab.compare.studies),
     "rank_scaling"?: {"rule": "rslora" | "alpha-2r" | "per-arm", "alpha", "text"} (rank study),
     "lr_ratio"?: {"arms": [full, lora], "estimate", "interval": [lo, hi] | null, "seeds", "per_seed",
                   "edge", "note"} (lr study: LoRA's fitted best LR / full's; see compare.lr_fit)}

Differences between arms are paired over the documents (and seeds): adaptlab.report.paired, from "per_doc".

learning = base NLL - tuned NLL on the held-out target test split; forgetting = tuned - base NLL on
general text, or drift KL(base || tuned), or the drop in multiple-choice accuracy.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from adaptlab.compare.arms import RunPlan, rank_scaling_of
from adaptlab.compare.spec import ArmSpec, CompareSpec
from adaptlab.evaluate.stats import t95
from adaptlab.report.paired import FALLBACK_NOTE, per_doc_of
from adaptlab.rundir import RunDir


def forgetting_metric(spec: CompareSpec) -> str:
    if spec.general:
        return "general_nll"
    if spec.drift:
        return "drift_kl"
    return "mc_acc_drop"


def learning_of(ev: dict[str, Any]) -> dict[str, Any]:
    t = ev["target"]
    lo, hi = t["delta"]["ci95"]
    return {
        "value": -t["delta"]["nll"],
        "ci95": [-hi, -lo],
        "base_nll": t["base"]["nll"],
        "tuned_nll": t["nll"],
        "tokens": t["tokens"],
        "docs": t.get("docs"),
    }


def _quantized_base(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """Learning and general-NLL change of a QLoRA arm's 4-bit base alone (adapter off), per run combined."""
    out: dict[str, Any] = {}
    if all("target" in e for e in evs):
        out["learning"] = _combine([learning_of(e) for e in evs])
    if all("general" in e for e in evs):
        out["general_nll"] = _combine([forgetting_of(e, "general_nll")["general_nll"] for e in evs])
    return out


def _quantization_note(name: str, rec: dict[str, Any]) -> str:
    """Say how much of a QLoRA arm's figures is the NF4 base rather than the adapter."""
    q = rec["quantized_base"]
    parts = [
        f"{name} is measured against the full-precision base like every arm, so its figures include "
        "quantizing the base to NF4"
    ]
    if "learning" in q:
        own = rec["learning"]["value"] - q["learning"]["value"]
        parts.append(
            f"the 4-bit base alone (adapter off) scores learning {_fmt(q['learning'])}, "
            f"so the adapter itself gained about {own:.4f} nats/token on top of it"
        )
    if "general_nll" in q:
        parts.append(f"the 4-bit base alone changes general NLL by {_fmt(q['general_nll'])}")
    return "; ".join(parts) + "."


def _fmt(f: dict[str, Any]) -> str:
    lo, hi = f["ci95"]
    return f"{f['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def forgetting_of(ev: dict[str, Any], metric: str) -> dict[str, Any]:
    out: dict[str, Any] = {"metric": metric}
    if "general" in ev:
        g = ev["general"]
        out["general_nll"] = {
            "value": g["delta"]["nll"],
            "ci95": list(g["delta"]["ci95"]),
            "base_nll": g["base"]["nll"],
            "tuned_nll": g["nll"],
            "tokens": g["tokens"],
        }
    if "drift" in ev:
        d = ev["drift"]
        out["drift"] = {
            "value": d["kl"],
            "ci95": list(d["ci95"]),
            "tokens": d["tokens"],
            "source": d["source"],
        }
    if "mc" in ev:
        out["mc"] = {}
        for stem, m in ev["mc"].items():
            lo, hi = m["delta"]["ci95"]
            out["mc"][stem] = {
                "value": -m["delta"]["acc"],
                "ci95": [-hi, -lo],
                "base_acc": m["base"]["acc"],
                "acc": m["acc"],
                "n": m["n"],
            }
    primary = {"general_nll": out.get("general_nll"), "drift_kl": out.get("drift")}.get(metric)
    if metric == "mc_acc_drop" and out.get("mc"):
        primary = next(iter(out["mc"].values()))
    if primary is not None:
        out["value"], out["ci95"] = primary["value"], primary["ci95"]
    return out


def _combine(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds; the 95% interval widens the mean per-seed CI by the seed-to-seed spread."""
    if len(figures) == 1:
        return figures[0]
    values = [f["value"] for f in figures]
    mean = statistics.fmean(values)
    sd = statistics.stdev(values)
    half_eval = statistics.fmean((f["ci95"][1] - f["ci95"][0]) / 2 for f in figures)
    half_seed = t95(len(values) - 1) * sd / math.sqrt(len(values))
    half = math.hypot(half_eval, half_seed)
    out = dict(figures[0])
    out.update(
        value=mean,
        ci95=[mean - half, mean + half],
        spread={"n": len(values), "std": sd, "min": min(values), "max": max(values), "values": values},
    )
    return out


def _target_kl(evs: list[dict[str, Any]]) -> dict[str, float] | None:
    """Mean over seeds of KL both ways on the held-out target text (None: not measured)."""
    if not all("target_kl" in e for e in evs):
        return None
    return {k: statistics.fmean(e["target_kl"][k] for e in evs) for k in ("base_tuned", "tuned_base")}


def _analysis_summary(an: dict[str, Any] | None, run_dir: Path, out: Path) -> dict[str, Any] | None:
    if not an:
        return None
    t = an.get("totals") or {}
    layers = t.get("layers", 0)
    heatmaps = [
        str(Path(p).resolve().relative_to(out.resolve())) for p in an.get("heatmaps", []) if Path(p).exists()
    ]
    if not heatmaps:
        heatmaps = [
            str((run_dir / n).relative_to(out))
            for n in ("intruders.png", "rel_update_norm.png")
            if (run_dir / n).exists()
        ]
    return {
        "k": an.get("k"),
        "eps": an.get("eps"),
        "layers": layers,
        "intruders": t.get("intruders", 0),
        "layers_with_intruders": t.get("layers_with_intruders", 0),
        "intruders_per_layer": t.get("intruders", 0) / layers if layers else None,
        "rel_update_norm": t.get("rel_update_norm"),
        "mean_effective_rank": t.get("mean_effective_rank"),
        "mean_stable_rank": t.get("mean_stable_rank"),
        "by_module_type": {
            k: {
                "intruders": v.get("intruders"),
                "layers": v.get("layers"),
                "rel_update_norm": v.get("rel_update_norm"),
            }
            for k, v in (t.get("by_module_type") or {}).items()
        },
        "eps_sweep": an.get("eps_sweep"),
        "heatmaps": heatmaps,
    }


def _cost(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    mean = lambda key: statistics.fmean(s.get(key) or 0.0 for s in summaries)  # noqa: E731
    s0 = summaries[0]
    spreads = [s["step_time"] for s in summaries if s.get("step_time")]
    return {
        "trainable_params": s0["trainable_params"],
        "total_params": s0["total_params"],
        "peak_mem_bytes": max(s["peak_mem_bytes"] for s in summaries),
        "wall_s": mean("wall_s"),
        "tokens_per_s": mean("tokens_per_s"),
        "artifact_bytes": s0["artifact_bytes"],
        "tokens_seen": s0["tokens_seen"],
        "precision": s0.get("precision"),
        "device": s0.get("device"),
        "noisy_machine": any(x.get("noisy") for x in spreads) if spreads else None,
        "step_time_cv": max((x.get("cv") or 0.0) for x in spreads) if spreads else None,
    }


def _replicates(arm: ArmSpec, plans: list[RunPlan], sweeps: dict[str, dict[str, Any]]) -> list[RunPlan]:
    """The runs that stand for the arm (its swept runs at the chosen LR only), in seed order."""
    reps = [
        p
        for p in plans
        if p.arm == arm.name and (not p.sweep or p.lr == sweeps.get(arm.name, {}).get("best_lr"))
    ]
    reps.sort(key=lambda p: p.seed_index)  # seed s of every arm saw the same data order: pairs
    return reps


def _arm_config(arm: ArmSpec, plan: RunPlan, sweeps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The arm's "config" entry: method fields, LR and where it came from, batch, steps, token budget, data."""
    train = plan.train_fields
    return {
        **plan.method_fields,
        "lr": plan.lr if plan.lr is not None else sweeps.get(arm.name, {}).get("best_lr"),
        "lr_source": plan.lr_source,
        "batch": train["batch"],
        "grad_accum": train["grad_accum"],
        "seq_len": train["seq_len"],
        "steps": train["steps"],
        "tokens": train["steps"] * train["batch"] * train["grad_accum"] * train["seq_len"],
        "data_fraction": arm.data_fraction,
        "data": arm.data,
        "init_from": arm.init_from,
    }


def _failure(
    arm: ArmSpec,
    reps: list[RunPlan],
    status: dict[str, dict[str, Any]],
    measured: dict[str, dict[str, Any]],
) -> str | None:
    """Why the arm has no figures ("run: error" of its first failed run), or None when every run was measured."""
    failed = [p.run for p in reps if status.get(p.run, {}).get("status") != "ok" or p.run not in measured]
    if reps and not failed:
        return None
    errors = [status.get(r, {}).get("error", "not run") for r in failed] or ["no run"]
    return f"{failed[0] if failed else arm.name}: {errors[0]}"


def _measured_fields(
    reps: list[RunPlan], measured: dict[str, dict[str, Any]], metric: str, out: Path
) -> dict[str, Any]:
    """An arm's figures, combined over its seeds: learning, forgetting, cost, losses, analysis, per-doc
    numbers, and where they exist its learning on its own data, its 4-bit base alone and its per-seed rows."""
    evs = [measured[p.run]["eval"] for p in reps]
    summaries = [RunDir(out / "runs" / p.run).read_summary() for p in reps]
    fields: dict[str, Any] = {
        "status": "ok",
        "learning": _combine([learning_of(e) for e in evs]),
        "forgetting": _combine([forgetting_of(e, metric) for e in evs]),
        "cost": _cost(summaries),
        "final_train_loss": statistics.fmean(s["final_train_loss"] for s in summaries),
        "final_val_loss": (
            statistics.fmean(s["final_val_loss"] for s in summaries)
            if all(s.get("final_val_loss") is not None for s in summaries)
            else None
        ),
        "analysis": _analysis_summary(measured[reps[0].run]["analysis"], out / "runs" / reps[0].run, out),
        "per_doc": per_doc_of(evs),
        "target_kl": _target_kl(evs),
    }
    own = [measured[p.run].get("own") for p in reps]
    if all(o is not None for o in own):  # an arm on data of its own: learning on that data's held-out split
        fields["own_learning"] = _combine([learning_of(o) for o in own])  # type: ignore[arg-type]
    quantized = [e["quantized_base"] for e in evs if "quantized_base" in e]
    if quantized and len(quantized) == len(evs):
        fields["quantized_base"] = _quantized_base(quantized)
    if len(reps) > 1:
        fields["per_seed"] = [
            {
                "run": p.run,
                "seed": p.seed,
                "learning": learning_of(e)["value"],
                "forgetting": forgetting_of(e, metric).get("value"),
            }
            for p, e in zip(reps, evs, strict=True)
        ]
    return fields


def _arm_record(
    arm: ArmSpec,
    plans: list[RunPlan],
    status: dict[str, dict[str, Any]],
    sweeps: dict[str, dict[str, Any]],
    measured: dict[str, dict[str, Any]],
    metric: str,
    out: Path,
) -> dict[str, Any]:
    """One entry of results.json "arms": its config and runs, then its figures or why it failed."""
    reps = _replicates(arm, plans, sweeps)
    config = _arm_config(arm, reps[0] if reps else [p for p in plans if p.arm == arm.name][0], sweeps)
    record: dict[str, Any] = {
        "name": arm.name,
        "method": arm.method + ("+rslora" if arm.rslora and arm.is_lora else ""),
        "label": arm.label,
        "config": config,
        "runs": [{"run": p.run, "dir": f"runs/{p.run}", "seed": p.seed} for p in reps],
        "seeds": len(reps),
        "lr_sweep": sweeps.get(arm.name),
    }
    error = _failure(arm, reps, status, measured)
    if error is not None:
        record.update(status="failed", error=error)
    else:
        record.update(_measured_fields(reps, measured, metric, out))
    return record


def _budget_note(spec: CompareSpec, records: list[dict[str, Any]]) -> str:
    """One line on the token budgets: equal across arms, or different by the study's design."""
    budgets = {r["config"]["tokens"] for r in records}
    if len(budgets) <= 1:
        return f"every arm saw the same {next(iter(budgets)):,} tokens in the same order"
    return f"budgets differ by design in this {spec.study or 'comparison'} study: " + ", ".join(
        f"{r['name']} {r['config']['tokens']:,}" for r in records
    )


def _lr_rule(spec: CompareSpec) -> str:
    """The rule that gave an LR to the arms that set none."""
    return (
        f"arms without an explicit LR: full fine-tuning at the base LR {spec.train.lr:g}, the LoRA family at "
        f"{spec.train.lora_lr_factor:g}x it ({spec.train.default_lr('lora'):g}), the rule of "
        '"LoRA Without Regret" (Thinking Machines 2025)'
    )


def assemble(
    spec: CompareSpec,
    arms: list[ArmSpec],
    plans: list[RunPlan],
    status: dict[str, dict[str, Any]],
    sweeps: dict[str, dict[str, Any]],
    measured: dict[str, dict[str, Any]],
    out: Path,
    notes: list[str],
) -> dict[str, Any]:
    """results.json (the schema above) from the comparison's arms, runs, sweeps and measurements."""
    from adaptlab.report.extrapolate import extrapolate
    from adaptlab.report.predictor import kl_predictor
    from adaptlab.report.recommend import recommend

    metric = forgetting_metric(spec)
    records = [_arm_record(a, plans, status, sweeps, measured, metric, out) for a in arms]
    notes = list(notes) + [_quantization_note(r["name"], r) for r in records if "quantized_base" in r]
    results: dict[str, Any] = {
        "version": 1,
        "study": spec.study,
        "model": spec.model,
        "data": {
            "target": spec.data.train,
            "general": spec.general,
            "drift": spec.drift,
            "mc": spec.mc,
            "eval_docs": spec.eval.max_docs,
            "eval_max_chars": spec.eval.max_chars,
        },
        "budget_tokens": spec.tokens,
        "budget_equal": len({r["config"]["tokens"] for r in records}) <= 1,
        "budget_note": _budget_note(spec, records),
        "lr_rule": _lr_rule(spec),
        "seeds": spec.seeds,
        "target_tokens": spec.target_tokens,
        "forgetting_metric": metric,
        "limits": spec.limits.model_dump(),
        "notes": notes,
        "arms": records,
    }
    if spec.study == "rank":
        results["rank_scaling"] = rank_scaling_of(arms)
    if any(r.get("status") == "ok" and not r.get("per_doc") for r in records):
        notes.append(FALLBACK_NOTE)
    results["kl_predictor"] = kl_predictor(records, metric)
    results["extrapolation"] = extrapolate(records, metric, spec.target_tokens)
    results["recommendation"] = recommend(results)
    return results
