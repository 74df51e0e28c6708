"""Which arms may be compared: a pair enters a contrast only when its two arms match on every factor
but the one under test.

An arm's factors are read from its resolved config in results.json (compare/results.py):

    method     the method and its own settings (dropout; rslora is part of the method's name)
    rank       the LoRA rank and alpha (alpha follows the rank unless set)
    targets    which Linears train; full fine-tuning counts as all-linear, the set LoRA is compared on
    precision  the base's precision: NF4 for QLoRA, else the run's training precision
    data       the training data and the fraction of it used
    tokens     the training budget in tokens
    init_from  where training starts: the base, or another arm of the comparison, compared by what
               that arm was (its method, data, budget, batch ...), not by its name: full-a-then-b and
               lora-a-then-b match, each continuing its own method's run on A
    batch      the global batch (batch x grad_accum) and the sequence length
    lr_policy  how the LR was set: rule, explicit or sweep (full and LoRA at their own rule LRs match)
    seeds      the seeds of the arm's runs (differences are paired seed by seed)

Testing "method" lets rank differ too (full fine-tuning has none); testing "targets" lets the rank
differ (attention-only LoRA is matched to all-linear LoRA by trainable parameters, so its rank is
higher); testing "rank" lets alpha differ with it.

    python -c "from adaptlab.findings.pairs import FACTORS; print(FACTORS)"
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

Arm = dict[str, Any]
"""One arm of results.json (compare/results.py documents its fields)."""

FACTORS = (
    "method",
    "rank",
    "targets",
    "precision",
    "data",
    "tokens",
    "init_from",
    "batch",
    "lr_policy",
    "seeds",
)
FREED_WITH = {"method": ("rank",), "targets": ("rank",)}
"""Factors that may differ along with the one under test (see the module docstring)."""
LORA_FAMILY = ("lora", "lora+rslora", "dora", "qlora")


def _frozen(x: Any) -> Hashable:
    return tuple(x) if isinstance(x, list) else x


def is_full(arm: Arm) -> bool:
    return arm.get("method") == "full"


def is_lora_family(arm: Arm) -> bool:
    return arm.get("method") in LORA_FAMILY


def global_batch(arm: Arm) -> int | None:
    c = arm.get("config") or {}
    return None if c.get("batch") is None else c["batch"] * (c.get("grad_accum") or 1)


def _stage(name: str | None, arm: Arm, by_name: dict[str, Arm], depth: int) -> Hashable:
    """What an arm starts from: the base (None), or what the arm it continues was trained as."""
    if name is None:
        return None
    start = by_name.get(name)
    if start is None or depth > 8:
        return ("unknown", name)
    f = factors(start, by_name, depth + 1)
    same_method = start.get("method") == arm.get("method")
    return (same_method, f["data"], f["tokens"], f["batch"], f["lr_policy"], f["seeds"], f["init_from"])


def factors(arm: Arm, by_name: dict[str, Arm], depth: int = 0) -> dict[str, Hashable]:
    """The arm's value of every factor in FACTORS, from its resolved config."""
    c = arm.get("config") or {}
    method = arm.get("method")
    full = method == "full"
    return {
        "method": ("lora" if method == "qlora" else method, c.get("dropout")),
        "rank": None if full else (c.get("rank"), c.get("alpha")),
        "targets": "all-linear" if full else _frozen(c.get("targets", "all-linear")),
        "precision": "nf4" if method == "qlora" else (arm.get("cost") or {}).get("precision"),
        "data": (_frozen(c.get("data")), c.get("data_fraction")),
        "tokens": c.get("tokens"),
        "init_from": _stage(c.get("init_from"), arm, by_name, depth),
        "batch": (global_batch(arm), c.get("seq_len")),
        "lr_policy": c.get("lr_source"),
        "seeds": tuple(r.get("seed") for r in arm.get("runs") or []),
    }


def _free(under_test: tuple[str, ...]) -> set[str]:
    unknown = [f for f in under_test if f not in FACTORS]
    assert not unknown, f"unknown factors {unknown}"
    return {*under_test, *(x for f in under_test for x in FREED_WITH.get(f, ()))}


def matched(x: Arm, y: Arm, under_test: tuple[str, ...], by_name: dict[str, Arm]) -> bool:
    """True when x and y differ in the factors under test and match on every other one."""
    fx, fy = factors(x, by_name), factors(y, by_name)
    free = _free(under_test)
    same_rest = all(fx[f] == fy[f] for f in FACTORS if f not in free)
    return same_rest and any(fx[f] != fy[f] for f in under_test)


def matched_pairs(
    arms: list[Arm],
    factor: str | tuple[str, ...],
    a: Callable[[Arm], bool] = lambda _: True,
    b: Callable[[Arm], bool] = lambda _: True,
) -> list[tuple[Arm, Arm]]:
    """Every (x, y), x picked by `a` and y by `b`, that differ in `factor` and match on every other one.

    Arms that differ in data, budget, init_from, targets, batch, precision, LR policy or seeds (other
    than the factor under test) are never paired."""
    under_test = (factor,) if isinstance(factor, str) else factor
    by_name = {arm["name"]: arm for arm in arms}
    return [
        (x, y)
        for x in arms
        if a(x)
        for y in arms
        if y is not x and b(y) and matched(x, y, under_test, by_name)
    ]
