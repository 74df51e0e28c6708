"""LoRA capacity, learning rates, batch sizes and the recommendation, each with the reason behind it.

Capacity heuristic (a heuristic, not a law): a language model stores at most ~2 bits of knowledge per
parameter (Allen-Zhu & Li 2024, "Physics of Language Models 3.3"), and we assume a training token
carries up to ~1 bit the base model does not already know. So a LoRA's capacity is ~2 x its trainable
parameters in unique training tokens. "LoRA Without Regret" (Schulman et al., Thinking Machines 2025)
found LoRA matches full fine-tuning until the data's information exceeds the adapter's capacity, and
that the optimal LoRA learning rate is ~10x full fine-tuning's and that LoRA pays more than full
fine-tuning at large batch sizes; "LoRA Learns Less and Forgets Less" (Biderman et al. 2024) found
LoRA keeps more general ability. Published findings enter the plan as priors with their mixed
evidence, never as facts about the user's run; comparisons already measured for the same base
(results.json under the compare root) are quoted instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adaptlab.config import FULL_LR, LORA_LR_FACTOR, default_lr

BITS_PER_PARAM = 2.0
BITS_PER_TOKEN = 1.0
HEURISTIC = (
    "heuristic: LoRA capacity ~ 2 bits per trainable parameter (Allen-Zhu & Li 2024) against an assumed "
    "<= 1 bit of new information per unique training token; LoRA falls behind full fine-tuning once data "
    "exceeds adapter capacity (Schulman et al., 'LoRA Without Regret', Thinking Machines 2025)"
)
FORGETTING_PRIOR = (
    "prior, not a measurement of your data: Biderman et al. 2024 found LoRA learns less and forgets less; "
    "the published evidence is mixed (docs/findings.md holds what adaptlab has measured, with its evidence), "
    "so which one forgets less here is for the compare command to measure"
)
MAX_MEASURED = 3
"""Comparisons quoted at most (the most recent first)."""
LORA_MAX_GLOBAL_BATCH = 32  # sequences per optimizer step
SEARCH_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def capacity_tokens(trainable: int) -> int:
    return int(BITS_PER_PARAM * trainable / BITS_PER_TOKEN)


def capacity(trainable: int, unique_tokens: int) -> dict[str, Any]:
    cap = capacity_tokens(trainable)
    return {
        "capacity_tokens": cap,
        "data_to_capacity": unique_tokens / cap if cap else float("inf"),
        "exceeded": unique_tokens > cap,
    }


def suggest_rank(params_at_rank: Any, unique_tokens: int) -> int | None:
    """Smallest power-of-two rank whose capacity covers the data (None: none up to 512 does)."""
    for r in SEARCH_RANKS:
        if capacity_tokens(params_at_rank(r)) >= unique_tokens:
            return r
    return None


def suggested_lrs() -> dict[str, Any]:
    return {
        "full": default_lr("full"),
        "lora": default_lr("lora"),
        "note": (
            f"LoRA family ~{LORA_LR_FACTOR:g}x the full fine-tuning LR of {FULL_LR:g} "
            "(Schulman et al. 2025; adaptlab's defaults)"
        ),
    }


def suggested_batch(batch: int, grad_accum: int, seq_len: int) -> dict[str, Any]:
    global_batch = batch * grad_accum
    lora = min(global_batch, LORA_MAX_GLOBAL_BATCH)
    return {
        "full_sequences_per_step": global_batch,
        "lora_sequences_per_step": lora,
        "note": (
            f"LoRA tolerates large batches worse than full fine-tuning (Schulman et al. 2025): keep it at "
            f"<= {LORA_MAX_GLOBAL_BATCH} sequences ({LORA_MAX_GLOBAL_BATCH * seq_len:,} tokens) per step"
        ),
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def recommend(
    methods: dict[str, dict[str, Any]],
    default_lora: str,
    task: str,
    unique_tokens: int,
    memory: int | None,
    command: str,
    measured: list[str] | None = None,
) -> dict[str, Any]:
    """Pick a method and say why in plain words; `methods` holds the per-method plans.

    measured: sentences quoting comparisons already run for this base (measured_comparisons); when
    there are none, the published forgetting finding is stated as a prior with its mixed evidence.
    """
    measured = measured or []
    full, lora = methods["full"], methods[default_lora]
    method, reasons = _choose(methods, default_lora, task, unique_tokens, memory)
    reasons += measured or [FORGETTING_PRIOR]
    if method != "full":
        reasons.append(
            f"one base serves many domains: each adapter is {lora['artifact_bytes'] / 2**20:.1f} MiB on disk vs "
            f"{full['artifact_bytes'] / 2**20:.0f} MiB for a fully fine-tuned copy"
        )
    reasons.append(
        "these are estimates and heuristics: "
        + (
            "the two DPO runs below (LoRA, full) and the drift of each measure it on your data"
            if task == "dpo"
            else "the compare command below measures it on your data"
        )
    )
    return {
        "method": method,
        "reasons": reasons,
        "priors": [FORGETTING_PRIOR],
        "measured": measured,
        "command": command,
    }


def _choose(
    methods: dict[str, dict[str, Any]], default_lora: str, task: str, unique_tokens: int, memory: int | None
) -> tuple[str, list[str]]:
    """The method `recommend` picks and the reasons that come from memory and capacity: QLoRA when only
    it can fit, LoRA when full does not fit, full when the data exceeds every planned rank, else LoRA."""
    full, lora, qlora = methods["full"], methods[default_lora], methods["qlora"]
    reasons: list[str] = []
    lora_keys = [k for k in methods if k.startswith("lora")]
    fitting_lora = [k for k in lora_keys if methods[k]["fits"]]
    biggest = max(lora_keys, key=lambda k: methods[k]["trainable_params"])
    exceeded_all = methods[biggest]["capacity"]["exceeded"]
    if not full["fits"] and not lora["fits"] and not fitting_lora:
        method = "qlora"
        if qlora["fits"]:
            reasons.append(
                f"only QLoRA fits in {_gib(memory or 0)}: its 4-bit base needs "
                f"{_gib(qlora['memory']['weights'])} for weights instead of {_gib(full['memory']['weights'])}"
            )
        else:
            reasons.append(
                f"nothing fits in {_gib(memory or 0)} at this batch and sequence length; QLoRA comes closest "
                f"({_gib(qlora['peak_mem_bytes'])}): lower --batch or --seq-len, or enable gradient checkpointing"
            )
    elif not full["fits"]:
        method = "lora"
        reasons.append(
            f"full fine-tuning needs ~{_gib(full['peak_mem_bytes'])} and does not fit in {_gib(memory or 0)}; "
            f"LoRA needs ~{_gib(lora['peak_mem_bytes'])}"
        )
        if exceeded_all:
            reasons.append(
                "the data likely exceeds every planned LoRA rank's capacity: use the largest rank that fits "
                "and expect LoRA to trail full fine-tuning (" + HEURISTIC + ")"
            )
    elif exceeded_all and task != "dpo":
        method = "full"
        reasons.append(
            f"{unique_tokens:,} unique training tokens exceed the capacity of every planned LoRA rank "
            f"(largest: {methods[biggest]['capacity']['capacity_tokens']:,} tokens), so full fine-tuning "
            "should learn more (" + HEURISTIC + ")"
        )
        reasons.append("full fine-tuning fits in memory")
    else:
        method = "lora"
        reasons += _lora_reasons(full, lora, task, unique_tokens)
    return method, reasons


def _lora_reasons(full: dict[str, Any], lora: dict[str, Any], task: str, unique_tokens: int) -> list[str]:
    """Why LoRA, when full fine-tuning fits too: the task's information per example, and its cost."""
    reasons: list[str] = []
    if task == "dpo":
        reasons.append(
            "preference / RL-style training carries little information per example; LoRA matched full "
            "fine-tuning there even at low rank (Schulman et al. 2025)"
        )
    else:
        reasons.append(
            f"{unique_tokens:,} unique training tokens fit within LoRA's capacity at the planned rank "
            f"({lora['capacity']['capacity_tokens']:,} tokens; {HEURISTIC})"
        )
    if task == "ift":
        reasons.append("instruction tuning mostly teaches format and style, which a low-rank update captures")
    reasons.append(
        f"LoRA needs {_gib(lora['peak_mem_bytes'])} vs {_gib(full['peak_mem_bytes'])} for full fine-tuning "
        f"and runs ~{full['time_per_epoch_s'] / max(lora['time_per_epoch_s'], 1e-9):.1f}x faster per epoch"
    )
    return reasons


def measured_comparisons(model: str, root: str | Path | None) -> list[str]:
    """One sentence per finished comparison of this base under root (results.json up to two levels down)."""
    if root is None or not Path(root).is_dir():
        return []
    found = []
    for path in [*Path(root).glob("*/results.json"), *Path(root).glob("*/*/results.json")]:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if results.get("model") == model and (results.get("recommendation") or {}).get("pick"):
            found.append((path.stat().st_mtime, path, results))
    return [_measured_sentence(p, r) for _, p, r in sorted(found, key=lambda x: -x[0])[:MAX_MEASURED]]


def _measured_sentence(path: Path, results: dict[str, Any]) -> str:
    rec = results["recommendation"]
    ok = [a for a in results.get("arms", []) if a.get("status") == "ok"]
    arms = ", ".join(
        f"{a['name']} learning {a['learning']['value']:.4f} / forgetting {a['forgetting'].get('value', float('nan')):.4f}"
        for a in ok[:6]
    )
    # findings.verdict's words, as the comparison's own report prints them (older results: the verdict alone)
    verdicts = {f["id"]: f.get("verdict_text") or f["verdict"] for f in rec.get("findings", [])}
    target = ", ".join(results.get("data", {}).get("target") or [])
    return (
        f"measured on this base ({path.parent}, target {target}, {results.get('forgetting_metric')}): "
        f"{arms}; pick {rec['pick']}; LoRA learns less: {verdicts.get('learns_less', 'not run')}, "
        f"LoRA forgets less: {verdicts.get('forgets_less', 'not run')}"
    )
