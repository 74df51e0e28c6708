"""LR sweeps inside a comparison: each swept arm's points and best LR, one more LR past the grid's edge
when the best lies on it, and the LR study's ratio of fitted optima (LoRA's best LR / full's).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from adaptlab.compare.arms import RunPlan, lr_text
from adaptlab.compare.spec import ArmSpec, CompareSpec
from adaptlab.rundir import RunDir

MAX_SWEEP_EXTENSIONS = 2
"""Extra LRs an LR sweep may try beyond its grid's edge when its best LR lies on that edge."""
EXTENSION_NOTE = "beyond the sweep's grid"


def extend_sweeps(
    spec: CompareSpec, plans: list[RunPlan], sweeps: dict[str, dict[str, Any]], extended: dict[str, int]
) -> list[RunPlan]:
    """One more LR beyond the edge of each sweep whose best LR lies on that edge (at most
    MAX_SWEEP_EXTENSIONS per arm), a grid step further (the ratio of the two LRs nearest that edge)."""
    new = []
    for arm, entry in sweeps.items():
        if not entry.get("best_at_edge") or extended.get(arm, 0) >= MAX_SWEEP_EXTENSIONS:
            continue
        lrs = sorted(pt["lr"] for pt in entry["points"])
        lr = lrs[-1] ** 2 / lrs[-2] if entry["best_lr"] == lrs[-1] else lrs[0] ** 2 / lrs[1]
        templates = {p.seed_index: p for p in plans if p.arm == arm and p.sweep}  # one per sweeping seed
        for s, template in sorted(templates.items()):
            suffix = f"-s{s}" if spec.seeds > 1 else ""
            new.append(
                dataclasses.replace(
                    template, run=f"{arm}-lr{lr_text(lr)}{suffix}", lr=lr, notes=[EXTENSION_NOTE]
                )
            )
        extended[arm] = extended.get(arm, 0) + 1
    return new


def sweep_results(
    plans: list[RunPlan], status: dict[str, dict[str, Any]], out: Path
) -> dict[str, dict[str, Any]]:
    """Per swept arm: each LR's final validation loss (the mean over the seeds that swept it) and the best
    LR (lowest); an arm swept at several seeds also keeps each seed's own points ("per_seed")."""
    raw: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        if not p.sweep:
            continue
        val = None
        if status.get(p.run, {}).get("status") == "ok":
            val = RunDir(out / "runs" / p.run).read_summary().get("final_val_loss")
        raw.setdefault(p.arm, []).append(
            {
                "lr": p.lr,
                "run": p.run,
                "seed_index": p.seed_index,
                "final_val_loss": val,
                "status": status[p.run]["status"],
                "beyond_grid": EXTENSION_NOTE in p.notes,
            }
        )
    return {arm: _sweep_entry(points) for arm, points in raw.items()}


def _sweep_entry(raw: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's sweep from its runs' points (one per LR and seed)."""
    entry: dict[str, Any] = {"points": [], "best_lr": None, "best_run": None, "grid_extensions": 0}
    for lr in dict.fromkeys(pt["lr"] for pt in raw):
        at = sorted((pt for pt in raw if pt["lr"] == lr), key=lambda pt: pt["seed_index"])
        vals = [pt["final_val_loss"] for pt in at]
        failed = next((pt["status"] for pt in at if pt["status"] != "ok"), None)
        entry["grid_extensions"] += at[0]["beyond_grid"]
        entry["points"].append(
            {
                "lr": lr,
                "run": at[0]["run"],
                "final_val_loss": sum(vals) / len(vals) if None not in vals else None,
                "status": failed or "ok",
                "beyond_grid": at[0]["beyond_grid"],
            }
        )
    seeds = sorted({pt["seed_index"] for pt in raw})
    if len(seeds) > 1:
        keep = ("lr", "run", "final_val_loss", "status")
        entry["per_seed"] = [
            {"seed_index": s, "points": [{k: pt[k] for k in keep} for pt in raw if pt["seed_index"] == s]}
            for s in seeds
        ]
    ok = [
        pt
        for pt in entry["points"]
        if pt["final_val_loss"] is not None and math.isfinite(pt["final_val_loss"])
    ]
    if ok:
        best = min(ok, key=lambda pt: pt["final_val_loss"])
        entry["best_lr"], entry["best_run"] = best["lr"], best["run"]
        lrs = sorted(pt["lr"] for pt in entry["points"])
        entry["best_at_edge"] = best["lr"] in (lrs[0], lrs[-1])
    for pt in entry["points"]:
        pt["chosen"] = pt["run"] == entry["best_run"]
    return entry


def add_lr_ratio(results: dict[str, Any], arms: list[ArmSpec], sweeps: dict[str, dict[str, Any]]) -> None:
    """The LR study's `lr_ratio` (LoRA's fitted best LR / full's) and each swept arm's `lr_optimum`."""
    from adaptlab.compare.lr_fit import lr_ratio

    every = [a for a in arms if a.sweep_every_seed]
    full = next((a.name for a in every if not a.is_lora), None)
    lora = next((a.name for a in every if a.is_lora), None)
    if full is None or lora is None:
        return
    curves = {name: _seed_curves(sweeps.get(name, {})) for name in (full, lora)}
    if any(c is None for c in curves.values()):
        results["lr_ratio"] = {
            "arms": [full, lora],
            "estimate": None,
            "interval": None,
            "seeds": 0,
            "per_seed": [],
            "edge": False,
            "note": "fewer than three LRs finished at every seed in an arm's sweep: no optimum to fit",
        }
        return
    record, opt_full, opt_lora = lr_ratio((full, lora), curves[full], curves[lora])  # type: ignore[arg-type]
    results["lr_ratio"] = record
    for rec in results["arms"]:
        if rec["name"] in (full, lora):
            rec["lr_optimum"] = opt_full if rec["name"] == full else opt_lora


def _seed_curves(entry: dict[str, Any]) -> tuple[list[float], Any] | None:
    """(LRs, validation loss per seed and LR) of a sweep: the LRs that finished at every seed (a diverged
    run's loss is inf); None below three such LRs."""
    import numpy as np

    per_seed = entry.get("per_seed") or [{"points": entry.get("points", [])}]
    lrs = sorted(pt["lr"] for pt in entry.get("points", []))
    table = np.full((len(per_seed), len(lrs)), np.nan)
    for i, seed in enumerate(per_seed):
        for pt in seed["points"]:
            if pt["status"] == "ok" and pt["final_val_loss"] is not None:
                v = pt["final_val_loss"]
                table[i, lrs.index(pt["lr"])] = v if math.isfinite(v) else np.inf
    keep = ~np.isnan(table).any(axis=0)
    if keep.sum() < 3:
        return None
    return [lr for lr, k in zip(lrs, keep, strict=True) if k], table[:, keep]
