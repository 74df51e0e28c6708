"""`adaptlab reproduce`: run the studies that test the published findings, and write docs/findings.md.

Each finding (FINDINGS) is a claim from the LoRA-vs-full literature, the study that tests it and a
rule that turns that study's results.json into a verdict: agrees / disagrees / inconclusive (the 95%
interval of the measured difference straddles zero) / not run. The studies run on the model (default
smollm2-135m) with two target domains; the forgetting finding is repeated on the healed base
(healed.py), so "full fine-tuning forgets less" can be told from "full fine-tuning repairs the
quantized base". Every comparison lives in OUT/<domain>/<study>/ and is reused when finished
(compare() itself skips finished runs and cached evaluations), so an interrupted reproduce resumes.
OUT/findings.json holds every verdict with its numbers; write_findings() renders it as Markdown.

Differences between arms of one comparison carry a 95% interval paired over the same held-out documents
(report/paired.py, as the comparison's own report); results without per-document numbers fall back to
the conservative rule there. The QLoRA finding (an adapter's gain over its own 4-bit base) and the
regime and continual rows combine intervals of separate figures: their half-widths added in quadrature.

    adaptlab reproduce --data-root ../shared/data --out repro            # ~ hours on 2 CPU cores
    adaptlab reproduce --data-root ../shared/data --out repro --dry-run  # the plan and its estimate
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptlab import outputs
from adaptlab.compare.studies import _diff
from adaptlab.config import COMPARE_SEEDS, EVAL_DOCS
from adaptlab.errors import StudyRefused, UserError
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


def run(
    comparisons: list[Comparison],
    out: str | Path,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    executor: Any = None,
    judge_only: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) every comparison, then judge every finding; write OUT/findings.json.

    OUT is claimed and locked first (adaptlab.outputs), as a comparison's folder is: a folder holding
    files adaptlab did not write is refused unless `overwrite`, and even then none of them is replaced.
    judge_only: run nothing; judge the comparisons whose OUT/<key>/results.json exists (the others'
    findings read "not run"). A comparison whose study refuses its settings (StudyRefused) is not run:
    its line is said and kept in findings.json, and the other comparisons go on."""
    out = Path(out)
    with outputs.owned(out, "reproduction", overwrite=overwrite):
        return _run(comparisons, out, on_event, executor, judge_only)


def _run(
    comparisons: list[Comparison],
    out: Path,
    on_event: Callable[[dict[str, Any]], None] | None,
    executor: Any,
    judge_only: bool,
) -> dict[str, Any]:
    from adaptlab.compare import build_spec, compare

    results: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    for c in comparisons:
        if judge_only:
            path = out / c.key / "results.json"
            if path.exists():
                results[c.key] = json.loads(path.read_text())
            continue
        say = on_event or (lambda e: None)
        say({"event": "comparison", "key": c.key})
        if c.study == "rl":
            results[c.key] = _run_rl(c, out / c.key, say)
            continue
        spec = build_spec(c.spec, source=c.key)
        try:
            results[c.key] = compare(spec, out / c.key, on_event=on_event, report=True, executor=executor)
        except StudyRefused as err:
            refused[c.key] = str(err)
            say({"event": "message", "text": f"{c.key}: not run: {err}"})
    verdicts = judge(comparisons, results)
    data = {
        "comparisons": [
            {
                "key": c.key,
                "study": c.study,
                "domain": c.domain,
                "model": c.spec["model"],
                "tokens": c.spec.get("tokens"),
                "finished": c.key in results,
                **({"refused": refused[c.key]} if c.key in refused else {}),
            }
            for c in comparisons
        ]
    }
    data["findings"] = verdicts
    (out / "findings.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def _run_rl(c: Comparison, out: Path, say: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The rl study (compare/rl.py); a finished one with the same settings is reused."""
    from dataclasses import asdict

    from adaptlab.compare.rl import RLStudy, run_study

    study = RLStudy(**c.spec)
    done = out / "results.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("study") == json.loads(json.dumps(asdict(study))):
            say({"event": "message", "text": f"{c.key}: finished earlier, reused"})
            return previous
    return run_study(study, out, on_event=lambda text: say({"event": "message", "text": f"{c.key}: {text}"}))


# ------------------------------------------------------------------------------------------ findings


@dataclass
class Finding:
    id: str
    claim: str
    source: str
    study: str  # which comparison's results it reads
    rule: Callable[[dict[str, Any]], dict[str, Any]]
    note: str = ""
    also: tuple[str, ...] = ()  # other studies whose results hold the arms it compares
    domains: list[str] = field(default_factory=list)


def _arms(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["name"]: a for a in results.get("arms", []) if a.get("status") == "ok"}


def _verdict_of(diff: dict[str, Any] | None, detail: str) -> dict[str, Any]:
    """agrees when the interval of the difference lies above 0, disagrees below, else inconclusive."""
    if diff is None:
        return {"verdict": "not run", "value": None, "ci95": None, "detail": detail + " (arms missing)"}
    lo, hi = diff["ci95"]
    verdict = "agrees" if lo > 0 else "disagrees" if hi < 0 else "inconclusive"
    if diff.get("paired") is False:
        detail += "; per-arm intervals, conservative: per-document numbers missing"
    return {"verdict": verdict, "value": diff["value"], "ci95": [lo, hi], "detail": detail}


def _fig(arm: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    return None if arm is None else arm.get(key)


def _paired(r: dict[str, Any], terms: list[tuple[float, str]], metric: str) -> dict[str, Any] | None:
    """sum of w x metric(arm) over the named arms, with its interval paired over the same held-out
    documents (report/paired.py); None when an arm is missing."""
    from adaptlab.report.paired import contrast

    a = _arms(r)
    if any(name not in a for _, name in terms):
        return None
    return contrast([(w, a[name]) for w, name in terms], metric, r.get("forgetting_metric", "drift_kl"))


def lora_learns_less(r: dict[str, Any]) -> dict[str, Any]:
    return _verdict_of(_paired(r, [(1, "full"), (-1, "lora")], "learning"), "learning full - LoRA")


def lora_forgets_less(r: dict[str, Any]) -> dict[str, Any]:
    d = _paired(r, [(1, "full"), (-1, "lora")], "forgetting")
    return _verdict_of(d, f"forgetting ({r.get('forgetting_metric')}) full - LoRA")


def lora_lr_10x(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    sweeps = {n: (a.get(n) or {}).get("lr_sweep") or {} for n in ("full", "lora")}
    full, lora = sweeps["full"].get("best_lr"), sweeps["lora"].get("best_lr")
    if not full or not lora:
        return {"verdict": "not run", "value": None, "ci95": None, "detail": "best LR ratio LoRA / full"}
    ratio = lora / full
    edge = sweeps["full"].get("best_at_edge") or sweeps["lora"].get("best_at_edge")
    verdict = "inconclusive" if edge else "agrees" if 3 <= ratio <= 30 else "disagrees"
    detail = f"best LR ratio LoRA / full ({lora:.1e} / {full:.1e})" + (
        "; a best LR at the sweep's edge" if edge else ""
    )
    return {"verdict": verdict, "value": ratio, "ci95": None, "detail": detail}


def all_layers_beat_attention(r: dict[str, Any]) -> dict[str, Any]:
    all_linear = "lora-all" if "lora-all" in _arms(r) else "lora"
    d = _paired(r, [(1, all_linear), (-1, "lora-attn")], "learning")
    return _verdict_of(d, "learning all-linear - attention-only LoRA at matched parameters")


def lora_batch_sensitive(r: dict[str, Any]) -> dict[str, Any]:
    # (LoRA default - LoRA large) - (full default - full large): what LoRA loses at 4x batch beyond full
    terms = [(1, "lora-default"), (-1, "lora-large"), (-1, "full-default"), (1, "full-large")]
    return _verdict_of(_paired(r, terms, "learning"), "learning lost at 4x batch: LoRA's loss - full's loss")


def rank_helps(r: dict[str, Any]) -> dict[str, Any]:
    ranks = sorted(int(n.removeprefix("lora-r")) for n in _arms(r) if n.startswith("lora-r"))
    if len(ranks) < 2:
        return _verdict_of(None, "learning highest - lowest rank")
    low, high = ranks[0], ranks[-1]
    d = _paired(r, [(1, f"lora-r{high}"), (-1, f"lora-r{low}")], "learning")
    return _verdict_of(d, f"learning rank {high} - rank {low}")


def lora_gap_grows_with_data(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    low = sorted(n for n in a if n.startswith("lora-r") and n.endswith("-1pct"))
    if not low:
        return _verdict_of(None, "full - LoRA learning gap at 100% minus at 1% of the data")
    rank = low[0].split("-")[1]
    # (full - LoRA) at 100% of the data minus (full - LoRA) at 1%
    terms = [(1, "full-100pct"), (-1, f"lora-{rank}-100pct"), (-1, "full-1pct"), (1, f"lora-{rank}-1pct")]
    return _verdict_of(
        _paired(r, terms, "learning"), f"full - LoRA ({rank}) learning gap at 100% minus at 1%"
    )


def lora_has_intruders(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    per = {n: ((a.get(n) or {}).get("analysis") or {}).get("intruders_per_layer") for n in ("full", "lora")}
    if per["full"] is None or per["lora"] is None:
        return {
            "verdict": "not run",
            "value": None,
            "ci95": None,
            "detail": "intruders per layer LoRA - full",
        }
    value = per["lora"] - per["full"]
    verdict = "agrees" if value > 0 else "disagrees" if value < 0 else "inconclusive"
    detail = f"intruders per layer: LoRA {per['lora']:.2f}, full {per['full']:.2f} (counts, no interval)"
    return {"verdict": verdict, "value": value, "ci95": None, "detail": detail}


def qlora_matches_lora(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    qlora = _fig(a.get("qlora"), "learning")
    base4 = ((a.get("qlora") or {}).get("quantized_base") or {}).get("learning")
    if qlora is not None and base4 is not None:  # the adapter's own gain, over the 4-bit base it trained on
        qlora = _diff(qlora, base4)
    d = _diff(_fig(a.get("lora"), "learning"), qlora)
    if d is None:
        return _verdict_of(None, "learning LoRA - QLoRA (bitsandbytes needed)")
    margin = 0.1 * abs(a["lora"]["learning"]["value"])
    lo, hi = d["ci95"]
    verdict = (
        "agrees"
        if -margin <= lo and hi <= margin
        else "disagrees"
        if lo > margin or hi < -margin
        else "inconclusive"
    )
    over = " (QLoRA's over its 4-bit base)" if base4 is not None else ""
    detail = f"learning LoRA - QLoRA{over}; agrees within +-{margin:.4f} (10% of LoRA's learning)"
    return {"verdict": verdict, "value": d["value"], "ci95": [lo, hi], "detail": detail}


def rank_1_suffices_in_rl(r: dict[str, Any]) -> dict[str, Any]:
    v = r.get("rank1_vs_full")
    d = None if not v else {"value": v["delta_pass1"], "ci95": v["ci95"]}
    return _verdict_of(d, "held-out pass@1 after GRPO: LoRA rank 1 - full")


def full_wins_cpt_lora_suits_ift(r: dict[str, Any]) -> dict[str, Any]:
    rows = {(x["regime"], x["budget"]): x for x in (r.get("regime") or {}).get("rows", [])}
    cpt, ift = rows.get(("cpt", "large"), {}), rows.get(("ift", "small"), {})
    d = _diff(cpt.get("full_minus_lora"), ift.get("full_minus_lora"))
    return _verdict_of(d, "full - LoRA learning gap: CPT at the large budget minus IFT at the small one")


def lora_keeps_more_in_continual(r: dict[str, Any]) -> dict[str, Any]:
    rows = {(x["method"], x["how"]): x for x in (r.get("continual") or {}).get("rows", [])}
    how = "A then B (init_from)"
    lora, full = rows.get(("lora", how), {}), rows.get(("full", how), {})
    return _verdict_of(
        _diff(lora.get("a_kept"), full.get("a_kept")), "change of learning on A after B: LoRA - full"
    )


FINDINGS = [
    Finding(
        "lora-learns-less",
        "LoRA learns less than full fine-tuning",
        "Biderman et al. 2024",
        "methods",
        lora_learns_less,
    ),
    Finding(
        "lora-forgets-less",
        "LoRA forgets less than full fine-tuning",
        "Biderman et al. 2024",
        "methods",
        lora_forgets_less,
    ),
    Finding(
        "lora-forgets-less-healed",
        "LoRA forgets less than full fine-tuning, on a healed (not 4-bit-rounded) base",
        "Biderman et al. 2024; control for the Q4_1 origin of smollm2-135m",
        "healed",
        lora_forgets_less,
    ),
    Finding(
        "lora-lr-10x",
        "LoRA's best LR is about 10x full fine-tuning's",
        "Thinking Machines 2025",
        "lr",
        lora_lr_10x,
    ),
    Finding(
        "all-layers",
        "LoRA on all linear layers beats attention-only at matched parameters",
        "Thinking Machines 2025",
        "targets",
        all_layers_beat_attention,
        also=("methods",),
    ),
    Finding(
        "lora-batch",
        "LoRA loses more than full fine-tuning at large batch sizes",
        "Thinking Machines 2025",
        "batch",
        lora_batch_sensitive,
    ),
    Finding(
        "rank", "a higher LoRA rank learns more", "Hu et al. 2021; Thinking Machines 2025", "rank", rank_helps
    ),
    Finding(
        "data-size",
        "LoRA falls further behind full fine-tuning as the data grows",
        "Thinking Machines 2025",
        "data-size",
        lora_gap_grows_with_data,
    ),
    Finding(
        "intruders",
        "LoRA introduces intruder dimensions; full fine-tuning does not",
        "Shuttleworth et al. 2024",
        "methods",
        lora_has_intruders,
    ),
    Finding(
        "qlora", "QLoRA learns about as much as LoRA", "Dettmers et al. 2023", "methods", qlora_matches_lora
    ),
    Finding(
        "cpt-vs-ift",
        "full fine-tuning's edge is larger for continued pre-training on more data than for instruction tuning on little",
        "Biderman et al. 2024",
        "regime",
        full_wins_cpt_lora_suits_ift,
    ),
    Finding(
        "continual",
        "LoRA keeps more of domain A than full fine-tuning after training on domain B",
        "Biderman et al. 2024; Shuttleworth et al. 2024",
        "continual",
        lora_keeps_more_in_continual,
    ),
    Finding(
        "rank-1-rl",
        "rank 1 suffices for reinforcement learning",
        "Thinking Machines 2025",
        "rl",
        rank_1_suffices_in_rl,
        note="agrees when rank 1 is distinguishably better than full, disagrees when distinguishably worse",
    ),
]


def judge(comparisons: list[Comparison], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per finding: the verdict in each comparison that tests it, and overall."""
    out = []
    for f in FINDINGS:
        rows = []
        for c in comparisons:
            if (c.study == f.study or c.study in f.also) and c.key in results:
                rows.append({"comparison": c.key, "domain": c.domain, **f.rule(results[c.key])})
        verdicts = {r["verdict"] for r in rows}
        overall = (
            "not run"
            if not rows or verdicts == {"not run"}
            else next(iter(verdicts))
            if len(verdicts) == 1
            else "mixed"
        )
        out.append(
            {
                "id": f.id,
                "claim": f.claim,
                "source": f.source,
                "study": f.study,
                "overall": overall,
                "rows": rows,
                "note": f.note,
            }
        )
    return out


def _num(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.4f}"


def _coverage(comparisons: list[dict[str, Any]]) -> list[str]:
    """Which of the reproduction's comparisons these verdicts rest on, and which have not run."""
    done = [c["key"] for c in comparisons if c.get("finished", True)]
    missing = [c["key"] for c in comparisons if not c.get("finished", True)]
    if not comparisons:
        return []
    models = sorted({c["model"] for c in comparisons if c.get("model")})
    budgets = sorted({c["tokens"] for c in comparisons if c.get("tokens")})
    lines = (
        [
            f"Models: {', '.join(models)}; training budget per arm: "
            + (", ".join(f"{t:,}" for t in budgets) or "-")
            + " tokens (the rl study counts episodes)."
        ]
        if models
        else []
    )
    lines.append(f"Comparisons judged ({len(done)}): " + (", ".join(f"`{k}`" for k in done) or "none") + ".")
    if missing:
        lines.append(f"Not run yet ({len(missing)}): " + ", ".join(f"`{k}`" for k in missing) + ".")
    return [" ".join(lines), ""]


FINDINGS_TITLE = "# Findings: what adaptlab measured of the published claims"


def check_findings_path(path: str | Path) -> None:
    """Refuse a --findings file that exists and was not written by adaptlab (it would be replaced)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--findings {p} is a directory: give a Markdown file name")
    if not p.exists():
        return
    try:
        first = p.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    except OSError as err:
        raise UserError(f"--findings {p}: cannot read ({err.strerror})") from None
    if first.strip() != FINDINGS_TITLE:
        raise UserError(
            f"--findings {p} exists and was not written by adaptlab: move it or choose another --findings"
        )


def write_findings(data: dict[str, Any], path: str | Path, header: str = "") -> Path:
    """docs/findings.md from findings.json: each finding, its verdict per comparison, with numbers and CIs."""
    lines = [
        FINDINGS_TITLE,
        "",
        header
        or "Written by `adaptlab reproduce` from its findings.json. Verdicts: agrees / disagrees when the 95% "
        "interval of the measured difference lies on one side of zero, inconclusive when it straddles it.",
        "",
        *_coverage(data.get("comparisons", [])),
        "| finding | claim | overall | comparison | measured | 95% CI | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in data["findings"]:
        rows = f["rows"] or [
            {"comparison": "-", "value": None, "ci95": None, "verdict": "not run", "detail": f["note"]}
        ]
        for i, r in enumerate(rows):
            ci = "-" if not r.get("ci95") else f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
            head = (f"`{f['id']}`", f["claim"], f"**{f['overall']}**") if i == 0 else ("", "", "")
            lines.append(
                f"| {' | '.join(head)} | {r['comparison']} | {_num(r.get('value'))}"
                + (f" ({r['detail']})" if r.get("detail") else "")
                + " "
                f"| {ci} | {r['verdict']} |"
            )
    sources = sorted({s for f in data["findings"] for s in f["source"].split("; ")})
    lines += ["", "Sources: " + "; ".join(sources) + ".", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
