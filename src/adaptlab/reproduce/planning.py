"""What a reproduction runs: the shipped data layout, the Scale of every comparison, the comparisons in
order (`plan`) and how long they take on the 2-core CPU (`estimate_s`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptlab.config import COMPARE_SEEDS, EVAL_DOCS
from adaptlab.errors import UserError
from adaptlab.healed import RECIPES

# the shipped data layout (DATA.md): domain name -> file under the data root
DOMAINS = {"legal": "legal/spdx_licenses.jsonl", "systems": "systems/man_pages.jsonl"}
GENERAL = "general/wordnet_glosses.jsonl"
REGIME_PAIRS = "instruct/wordnet_define.jsonl"
PER_DOMAIN = ("methods", "lr", "targets", "batch", "rank", "data-size")
STUDIES = (*PER_DOMAIN, "regime", "continual", "healed", "rl")
RL_TASK = "arithmetic"
# seconds per trained token on the 2-core CPU at 4 x 128, measured in reproduce's methods studies
# (docs/benchmarks.md): 7.6 s a full step and 5.6 s a LoRA step, the run's start and validation included
SECONDS_PER_TOKEN = {"full": 7.6 / 512, "lora": 5.6 / 512}
EVAL_SECONDS_PER_ARM = 135.0  # held-out target + general NLL, base and tuned, target KL, weight analysis
EVAL_SECONDS_DOCS = 16  # ... measured at this many documents per probe; scoring time grows with them
# the rl study on the 2-core CPU (bench/results/rl_study.json): a GRPO step of 4 prompts x 8 completions
# of 16 tokens (sampling included; 82-95 s for 8 steps after the first arm), and scoring 60 held-out
# prompts plus the drift probe, per arm and for the base (31-76 s)
RL_SECONDS_PER_STEP = 12.0
RL_EVAL_SECONDS = 65.0


@dataclass
class Scale:
    """How big every comparison is: the replicates and budget per arm and the evaluation sizes."""

    tokens: int = 8_192
    seeds: int = COMPARE_SEEDS
    batch: int = 4
    seq_len: int = 128
    eval_docs: int = EVAL_DOCS
    eval_chars: int = 2000
    eval_seq_len: int = 256
    analysis: bool = True
    rl_steps: int = 8  # the rl study: GRPO steps per arm and held-out prompts scored
    rl_eval_prompts: int = 60

    def rl_spec(self, model: str) -> dict[str, Any]:
        """The rl study's settings (compare/rl.py RLStudy), at bench/rl_study.py's CPU size."""
        return {
            "study": "rl",
            "model": model,
            "task": RL_TASK,
            "steps": self.rl_steps,
            "max_new_tokens": 16,
            "eval_prompts": self.rl_eval_prompts,
            "full_lr": 5e-5,
            "seeds": self.seeds,
        }

    def spec(
        self, model: str, study: str, data: str, general: str | None, test_frac: float, **extra: Any
    ) -> dict[str, Any]:
        return {
            "model": model,
            "study": study,
            "data": {"train": [data], "test_frac": test_frac},
            "general": [general] if general else [],
            "drift": general is None,
            "tokens": self.tokens,
            "seeds": self.seeds,
            "train": {
                "batch": self.batch,
                "seq_len": self.seq_len,
                "eval_points": 1,
                "eval_examples": 4,
                "checkpoints": 1 if self.tokens >= 8 * self.batch * self.seq_len else 0,
            },
            "eval": {
                "max_docs": self.eval_docs,
                "max_chars": self.eval_chars,
                "seq_len": self.eval_seq_len,
                "drift_prompts": 8,
                "drift_tokens": 32,
            },
            "analysis": {"enabled": self.analysis},
            **extra,
        }


def held_out_frac(path: str | Path, eval_docs: int) -> float:
    """The smallest test fraction (from the default 0.05, in steps of 0.01) whose held-out split of the
    file holds eval_docs documents, so every comparison scores that many."""
    from adaptlab.data.corpus import split_documents
    from adaptlab.data.sources import load_documents

    docs = load_documents(str(path))
    for step in range(5, 45):
        if len(split_documents(docs, "test", 0.05, step / 100)) >= eval_docs:
            return step / 100
    raise UserError(
        f"--eval-docs {eval_docs}: {path} has {len(docs)} documents, too few to hold out that many; "
        "lower --eval-docs"
    )


@dataclass
class Comparison:
    """One comparison of the reproduction: where it lives and its spec."""

    key: str  # <domain>/<study>
    study: str
    domain: str
    spec: dict[str, Any]


def plan(
    data_root: str | Path,
    model: str = "smollm2-135m",
    scale: Scale | None = None,
    studies: tuple[str, ...] = STUDIES,
    domains: tuple[str, ...] = tuple(DOMAINS),
) -> list[Comparison]:
    """Every comparison the reproduction runs, in order."""
    scale = scale or Scale()
    root = Path(data_root).expanduser()
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise UserError(f"--studies {', '.join(unknown)}: unknown; choose from {', '.join(STUDIES)}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise UserError(f"--domains {', '.join(unknown)}: unknown; choose from {', '.join(DOMAINS)}")
    files = {d: root / DOMAINS[d] for d in domains} if domains else {}
    missing = [str(p) for p in [*files.values(), root / GENERAL, root / REGIME_PAIRS] if not p.exists()]
    if missing:
        raise UserError(f"--data-root {root}: missing {missing[0]} (the layout of DATA.md's shared data)")
    general = str(root / GENERAL)
    fracs = {d: held_out_frac(p, scale.eval_docs) for d, p in files.items()}
    out = []
    for domain, path in files.items():
        for study in PER_DOMAIN:
            if study in studies:
                spec = scale.spec(model, study, str(path), general, fracs[domain])
                out.append(Comparison(f"{domain}/{study}", study, domain, spec))
        if "healed" in studies:
            healed = model + "-healed" if not model.endswith("-healed") else model
            spec = scale.spec(healed, "methods", str(path), general, fracs[domain])
            out.append(Comparison(f"{domain}/healed-methods", "healed", domain, spec))
    names = list(files)
    if "regime" in studies:  # WordNet: the same domain as raw glosses and as definition pairs
        frac = held_out_frac(general, scale.eval_docs)
        spec = scale.spec(model, "regime", general, None, frac, study_data=[str(root / REGIME_PAIRS)])
        out.append(Comparison("wordnet/regime", "regime", "wordnet", spec))
    if "continual" in studies and len(names) >= 2:
        a, b = names[0], names[1]
        spec = scale.spec(model, "continual", str(files[a]), general, fracs[a], study_data=[str(files[b])])
        out.append(Comparison(f"{a}-then-{b}/continual", "continual", f"{a}-then-{b}", spec))
    if "rl" in studies:  # GRPO on the embedded arithmetic task: LoRA ranks 1, 4, 16 and full
        out.append(Comparison(f"{RL_TASK}/rl", "rl", RL_TASK, scale.rl_spec(model)))
    return out


def estimate_s(comparisons: list[Comparison]) -> float:
    """Seconds on the 2-core CPU: trained tokens per method x measured seconds per token, plus evaluation."""
    from adaptlab.compare import build_spec
    from adaptlab.compare.arms import expand, resolve_ranks
    from adaptlab.compare.rl import RLStudy
    from adaptlab.compare.runner import resolve_spec

    total = 0.0
    for c in comparisons:
        if c.study == "rl":
            arms = len(RLStudy(**c.spec).arms())
            runs = arms * c.spec["seeds"]
            total += runs * c.spec["steps"] * RL_SECONDS_PER_STEP + (runs + 1) * RL_EVAL_SECONDS
            continue
        # the healed base has its base's shapes: plan with the base, so estimating builds nothing
        spec = resolve_spec(
            build_spec({**c.spec, "model": c.spec["model"].removesuffix("-healed")}, source=c.key)
        )
        arms, _ = resolve_ranks(spec)
        for p in expand(spec, arms):
            t = p.train_fields
            tokens = t["steps"] * t["batch"] * t["grad_accum"] * t["seq_len"]
            total += tokens * SECONDS_PER_TOKEN["full" if p.method_fields["method"] == "full" else "lora"]
        # every replicate is evaluated; scoring time grows with the documents scored
        docs = spec.eval.max_docs / EVAL_SECONDS_DOCS
        total += EVAL_SECONDS_PER_ARM * docs * len(arms) * spec.seeds
    healed = {c.spec["model"] for c in comparisons if c.study == "healed"}
    for name in healed:  # built once on first use: a short full fine-tuning (healed.py)
        r = RECIPES.get(name.removesuffix("-healed"), {"steps": 0, "batch": 0, "seq_len": 0})
        total += r["steps"] * r["batch"] * r["seq_len"] * SECONDS_PER_TOKEN["full"]
    return total
