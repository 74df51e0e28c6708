"""Each published claim adaptlab tests, declared once: its contrast, its test, its margin and its metric.

A contrast is side a minus side b over matched pairs of arms (findings/pairs.py), stated so that a
positive value is what the claim says. Its test decides how the 95% interval is read (verdict.py):
superiority (the interval above 0), non-inferiority (above -margin) or equivalence (inside
+-margin); "not distinguishable" is never read as "the same". An interaction contrasts the a - b
gap at two ends of a second factor (`within`): gap at the high end minus gap at the low end.

    python -c "from adaptlab.findings.claims import CLAIMS; print([c.id for c in CLAIMS])"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from adaptlab.findings.pairs import FACTORS, FREED_WITH, Arm, global_batch, is_full, is_lora_family

Test = Literal["superiority", "non-inferiority", "equivalence"]
Shape = Literal["difference", "interaction", "lr_ratio", "reported"]

BIDERMAN = "Biderman et al. 2024, LoRA Learns Less and Forgets Less (arXiv 2405.09673)"
REGRET = 'Schulman et al. 2025, "LoRA Without Regret" (Thinking Machines)'
SHUTTLEWORTH = (
    "Shuttleworth et al. 2024, LoRA vs Full Fine-tuning: An Illusion of Equivalence (arXiv 2410.21228)"
)
HU = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv 2106.09685)"
DETTMERS = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv 2305.14314)"

ABOUT_AS_MUCH = 0.10
""""Learns about as much" means within a tenth of the reference arm's own learning, either way. A
judgment, not a law: a smaller shortfall is below what a user would trade against a method's savings
in memory or time. Used by the QLoRA claim, the rank study's "smallest rank that learns about as much
as full" and the recommendation's learning ties."""
RL_PASS1_MARGIN = 0.05
"""Rank 1 "suffices" for RL when its held-out pass@1 is at most 5 points below full fine-tuning's: a
judgment of the loss a user choosing rank 1 for its cost would accept. With 60-100 held-out prompts
the paired interval is about +-0.1 wide, so this margin asks for more prompts (or seeds) before it
agrees: the honest answer at that size is "cannot tell"."""
CLAIMED_LR_RATIO = 10.0
"""LoRA's optimal LR over full fine-tuning's, as "LoRA Without Regret" reports it."""
LR_RATIO_TOLERANCE = 3.5
""""About 10x" means within a factor 3.5 either way, [2.86, 35]: wide enough that a measured ratio of
exactly 10 on the lr study's ~3x grids (whose half-steps put the optimum within about [3, 33]) can
agree, narrow enough that the same LR for both (ratio 1) or 100x cannot."""


@dataclass(frozen=True)
class Side:
    """One side of a contrast: which arms it takes, in words and as a test on an arm."""

    what: str
    pick: Callable[[Arm], bool]


@dataclass(frozen=True)
class Contrast:
    """Side a minus side b over pairs matched on every factor but `factor` (findings/pairs.py)."""

    factor: tuple[str, ...]
    a: Side
    b: Side
    metric: str
    """learning | own_learning | forgetting (the comparison's measure) | intruders_per_layer | pass1"""
    shape: Shape = "difference"
    order: Callable[[Arm], float] | None = None
    """difference: pairs with order(a) > order(b), the extremes kept (the rank study's highest and
    lowest rank); interaction: which end of `within` is high, the extremes kept."""
    within: tuple[str, ...] = ()
    """interaction: the factor(s) separating its two ends."""
    high: Callable[[Arm], bool] = lambda _: True
    low: Callable[[Arm], bool] = lambda _: True
    low_metric: str | None = None
    """interaction: the low end's metric when it is measured on other documents (regime: IFT arms)."""
    chain: bool = False
    """interaction: the low end's arms continue the high end's (init_from), as in the continual study."""
    needs: str = ""

    @property
    def matched_on(self) -> tuple[str, ...]:
        """The factors every pair must match on: all but the ones under test."""
        free = {*self.factor, *self.within, *(x for f in self.factor for x in FREED_WITH.get(f, ()))}
        return tuple(f for f in FACTORS if f not in free)


@dataclass(frozen=True)
class Claim:
    """A published claim: what it says, where from, the contrast that tests it, the test and its margin.

    margin: in the metric's units; with margin_relative, a fraction of side b's own figure; for a
    ratio (lr_ratio), a factor either way of `null`."""

    id: str
    claim: str
    source: str
    contrast: Contrast
    test: Test = "superiority"
    margin: float = 0.0
    margin_relative: bool = False
    null: float = 0.0


def _own_data(arm: Arm) -> bool:
    return bool((arm.get("config") or {}).get("data"))


def _from_base(arm: Arm) -> bool:
    return not (arm.get("config") or {}).get("init_from")


def _targets(arm: Arm) -> object:
    return (arm.get("config") or {}).get("targets", "all-linear")


FULL = Side("full fine-tuning from the base", lambda a: is_full(a) and _from_base(a))
LORA = Side("LoRA-family arms from the base", lambda a: is_lora_family(a) and _from_base(a))
PLAIN_LORA = Side("LoRA", lambda a: a.get("method") == "lora")

LEARNS_LESS = Claim(
    "learns_less",
    "LoRA learns less than full fine-tuning",
    BIDERMAN,
    Contrast(
        ("method",),
        Side(
            "full fine-tuning from the base, on the comparison's data",
            lambda a: FULL.pick(a) and not _own_data(a),
        ),
        LORA,
        "learning",
        needs="a full and a LoRA-family arm matched on data, budget, batch, targets and precision",
    ),
)
FORGETS_LESS = Claim(
    "forgets_less",
    "LoRA forgets less than full fine-tuning",
    BIDERMAN,
    Contrast(("method",), FULL, LORA, "forgetting", needs=LEARNS_LESS.contrast.needs),
)
FORGETS_LESS_HEALED = replace(
    FORGETS_LESS,
    id="forgets_less_healed",
    claim="LoRA forgets less than full fine-tuning, on a healed (not 4-bit-rounded) base",
    source=BIDERMAN + "; control for the Q4_1 origin of smollm2-135m",
)
LR_RATIO = Claim(
    "lr_ratio",
    f"LoRA's best learning rate is about {CLAIMED_LR_RATIO:g}x full fine-tuning's",
    REGRET,
    Contrast(
        ("method", "lr_policy"),
        Side("LoRA-family arms with an LR sweep", lambda a: is_lora_family(a) and bool(a.get("lr_sweep"))),
        Side("full fine-tuning with an LR sweep", lambda a: is_full(a) and bool(a.get("lr_sweep"))),
        "best_lr",
        shape="lr_ratio",
        needs="full and LoRA arms with LR sweeps (`--study lr`)",
    ),
    test="equivalence",
    margin=LR_RATIO_TOLERANCE,
    null=CLAIMED_LR_RATIO,
)
TARGETS = Claim(
    "targets",
    "LoRA on all linear layers learns more than attention-only LoRA at matched trainable parameters",
    REGRET,
    Contrast(
        ("targets",),
        Side("all-linear LoRA", lambda a: is_lora_family(a) and _targets(a) == "all-linear"),
        Side("attention-only LoRA", lambda a: is_lora_family(a) and _targets(a) == "attention"),
        "learning",
        needs="all-linear and attention-only LoRA arms of one method",
    ),
)
BATCH = Claim(
    "batch",
    "LoRA loses more than full fine-tuning when the batch grows",
    REGRET,
    Contrast(
        ("method",),
        FULL,
        LORA,
        "learning",
        shape="interaction",
        within=("batch", "tokens"),  # steps round differently at each batch: budgets may differ a little
        order=lambda a: float(global_batch(a) or 0),
        needs="full and LoRA arms at two or more batch sizes",
    ),
)
DATA_SIZE = Claim(
    "data_size",
    "LoRA falls further behind full fine-tuning as the data grows",
    f"{BIDERMAN}; {REGRET}",
    Contrast(
        ("method",),
        FULL,
        LORA,
        "learning",
        shape="interaction",
        within=("data", "tokens"),  # a data fraction trains epochs over its subset: its own budget
        order=lambda a: float((a.get("config") or {}).get("data_fraction") or 1.0),
        needs="full and LoRA arms on two or more data fractions",
    ),
)
RANK = Claim(
    "rank",
    "A higher LoRA rank learns more",
    f"{HU}; {REGRET}",
    Contrast(
        ("rank",),
        Side("LoRA at the highest rank", is_lora_family),
        Side("LoRA at the lowest rank", is_lora_family),
        "learning",
        order=lambda a: float((a.get("config") or {}).get("rank") or 0),
        needs="LoRA arms at two or more ranks",
    ),
)
INTRUDERS = Claim(
    "intruders",
    "LoRA introduces intruder dimensions that full fine-tuning does not",
    SHUTTLEWORTH,
    Contrast(
        ("method",), LORA, FULL, "intruders_per_layer", needs="the weight analysis of a full and a LoRA arm"
    ),
)
QLORA = Claim(
    "qlora",
    "QLoRA learns about as much as LoRA",
    DETTMERS,
    Contrast(
        ("precision",),
        Side("QLoRA", lambda a: a.get("method") == "qlora"),
        PLAIN_LORA,
        "learning",
        needs="a QLoRA and a LoRA arm of the same rank (bitsandbytes needed)",
    ),
    test="equivalence",
    margin=ABOUT_AS_MUCH,
    margin_relative=True,
)
REGIME = Claim(
    "regime",
    "Full fine-tuning's edge is larger for continued pre-training on more data than for instruction "
    "tuning on little",
    BIDERMAN,
    Contrast(
        ("method",),
        FULL,
        LORA,
        "learning",
        shape="interaction",
        within=("data", "tokens"),
        order=lambda a: float((a.get("config") or {}).get("tokens") or 0),
        high=lambda a: not _own_data(a),
        low=_own_data,
        low_metric="own_learning",
        needs="the regime study: full and LoRA on raw text and on instruction pairs at two budgets",
    ),
)
CONTINUAL = Claim(
    "continual",
    "LoRA keeps more of domain A than full fine-tuning after training on domain B",
    f"{BIDERMAN}; {SHUTTLEWORTH}",
    Contrast(
        ("method",),
        Side("full fine-tuning", is_full),
        Side("LoRA", lambda a: a.get("method") == "lora"),
        "learning",
        shape="interaction",
        within=("data", "init_from"),
        high=_from_base,
        low=lambda a: not _from_base(a),
        chain=True,
        needs="the continual study: full and LoRA on A, each continued on B",
    ),
)
RANK1_RL = Claim(
    "rank1_rl",
    "Rank 1 suffices for reinforcement learning",
    REGRET,
    Contrast(
        ("rank",),
        Side("LoRA rank 1", lambda a: a.get("rank") == 1),
        Side("full fine-tuning", is_full),
        "pass1",
        shape="reported",
        needs="the rl study (compare/rl.py)",
    ),
    test="non-inferiority",
    margin=RL_PASS1_MARGIN,
)

CLAIMS = (
    LEARNS_LESS,
    FORGETS_LESS,
    FORGETS_LESS_HEALED,
    LR_RATIO,
    TARGETS,
    BATCH,
    DATA_SIZE,
    RANK,
    INTRUDERS,
    QLORA,
    REGIME,
    CONTINUAL,
    RANK1_RL,
)
REPORT_CLAIMS = tuple(c for c in CLAIMS if c not in (FORGETS_LESS_HEALED, RANK1_RL))
"""The claims a comparison's report judges (the healed control and the RL study have their own runs)."""
