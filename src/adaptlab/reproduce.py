"""`adaptlab reproduce`: run the studies that test the published findings, and write docs/findings.md.

Each finding (FINDINGS) is a claim from the LoRA-vs-full literature, the study that tests it and a
rule that turns that study's results.json into a verdict: agrees / disagrees / inconclusive (the 95%
interval of the measured difference straddles zero) / not run. The studies run on the model (default
smollm2-135m) with two target domains; the forgetting finding is repeated on the healed base
(healed.py), so "full fine-tuning forgets less" can be told from "full fine-tuning repairs the
quantized base". Every comparison lives in OUT/<domain>/<study>/ and is reused when finished
(compare() itself skips finished runs and cached evaluations), so an interrupted reproduce resumes.
OUT/findings.json holds every verdict with its numbers; write_findings() renders it as Markdown.

Differences of two arms carry an approximate 95% interval: the half-widths of the two paired-bootstrap
intervals added in quadrature.

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

from adaptlab.compare.studies import _diff
from adaptlab.errors import UserError
from adaptlab.healed import RECIPES

# the shipped data layout (DATA.md): domain name -> file under the data root
DOMAINS = {"legal": "legal/spdx_licenses.jsonl", "systems": "systems/man_pages.jsonl"}
GENERAL = "general/wordnet_glosses.jsonl"
REGIME_PAIRS = "instruct/wordnet_define.jsonl"
PER_DOMAIN = ("methods", "lr", "targets", "batch", "rank", "data-size")
STUDIES = (*PER_DOMAIN, "regime", "continual", "healed")
# seconds per trained token on the 2-core CPU at 4 x 128 (DATA.md: 3.7 s full, 2.7 s LoRA per step)
SECONDS_PER_TOKEN = {"full": 3.7 / 512, "lora": 2.7 / 512}
EVAL_SECONDS_PER_ARM = 60.0  # held-out target + general NLL, base and tuned, at the default sizes


@dataclass
class Scale:
    """How big every comparison is: the budget per arm and the evaluation sizes."""

    tokens: int = 8_192
    batch: int = 4
    seq_len: int = 128
    eval_docs: int = 16
    eval_chars: int = 2000
    eval_seq_len: int = 256
    analysis: bool = True

    def spec(self, model: str, study: str, data: str, general: str | None, **extra: Any) -> dict[str, Any]:
        return {
            "model": model,
            "study": study,
            "data": {"train": [data]},
            "general": [general] if general else [],
            "drift": general is None,
            "tokens": self.tokens,
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
    files = {d: root / DOMAINS[d] for d in domains} if domains else {}
    unknown = [s for s in studies if s not in STUDIES]
    if unknown:
        raise UserError(f"--studies {', '.join(unknown)}: unknown; choose from {', '.join(STUDIES)}")
    missing = [str(p) for p in [*files.values(), root / GENERAL, root / REGIME_PAIRS] if not p.exists()]
    if missing:
        raise UserError(f"--data-root {root}: missing {missing[0]} (the layout of DATA.md's shared data)")
    general = str(root / GENERAL)
    out = []
    for domain, path in files.items():
        for study in PER_DOMAIN:
            if study in studies:
                out.append(
                    Comparison(
                        f"{domain}/{study}", study, domain, scale.spec(model, study, str(path), general)
                    )
                )
        if "healed" in studies:
            healed = model + "-healed" if not model.endswith("-healed") else model
            spec = scale.spec(healed, "methods", str(path), general)
            out.append(Comparison(f"{domain}/healed-methods", "healed", domain, spec))
    names = list(files)
    if "regime" in studies:  # WordNet: the same domain as raw glosses and as definition pairs
        spec = scale.spec(model, "regime", general, None, study_data=[str(root / REGIME_PAIRS)])
        out.append(Comparison("wordnet/regime", "regime", "wordnet", spec))
    if "continual" in studies and len(names) >= 2:
        a, b = names[0], names[1]
        spec = scale.spec(model, "continual", str(files[a]), general, study_data=[str(files[b])])
        out.append(Comparison(f"{a}-then-{b}/continual", "continual", f"{a}-then-{b}", spec))
    return out


def estimate_s(comparisons: list[Comparison]) -> float:
    """Seconds on the 2-core CPU: trained tokens per method x measured seconds per token, plus evaluation."""
    from adaptlab.compare import build_spec
    from adaptlab.compare.arms import expand, resolve_ranks
    from adaptlab.compare.runner import resolve_spec

    total = 0.0
    for c in comparisons:
        # the healed base has its base's shapes: plan with the base, so estimating builds nothing
        spec = resolve_spec(
            build_spec({**c.spec, "model": c.spec["model"].removesuffix("-healed")}, source=c.key)
        )
        arms, _ = resolve_ranks(spec)
        for p in expand(spec, arms):
            t = p.train_fields
            tokens = t["steps"] * t["batch"] * t["grad_accum"] * t["seq_len"]
            total += tokens * SECONDS_PER_TOKEN["full" if p.method_fields["method"] == "full" else "lora"]
        total += EVAL_SECONDS_PER_ARM * len(arms)
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
) -> dict[str, Any]:
    """Run (or reuse) every comparison, then judge every finding; write OUT/findings.json.

    judge_only: run nothing; judge the comparisons whose OUT/<key>/results.json exists (the others'
    findings read "not run")."""
    from adaptlab.compare import build_spec, compare

    out = Path(out)
    results: dict[str, dict[str, Any]] = {}
    for c in comparisons:
        if judge_only:
            path = out / c.key / "results.json"
            if path.exists():
                results[c.key] = json.loads(path.read_text())
            continue
        say = on_event or (lambda e: None)
        say({"event": "comparison", "key": c.key})
        spec = build_spec(c.spec, source=c.key)
        results[c.key] = compare(spec, out / c.key, on_event=on_event, report=True, executor=executor)
    verdicts = judge(comparisons, results)
    data = {"comparisons": [{"key": c.key, "study": c.study, "domain": c.domain} for c in comparisons]}
    data["findings"] = verdicts
    out.mkdir(parents=True, exist_ok=True)
    (out / "findings.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


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
    return {"verdict": verdict, "value": diff["value"], "ci95": [lo, hi], "detail": detail}


def _fig(arm: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    return None if arm is None else arm.get(key)


def lora_learns_less(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    return _verdict_of(
        _diff(_fig(a.get("full"), "learning"), _fig(a.get("lora"), "learning")), "learning full - LoRA"
    )


def lora_forgets_less(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    d = _diff(_fig(a.get("full"), "forgetting"), _fig(a.get("lora"), "forgetting"))
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
    a = _arms(r)
    d = _diff(_fig(a.get("lora-all") or a.get("lora"), "learning"), _fig(a.get("lora-attn"), "learning"))
    return _verdict_of(d, "learning all-linear - attention-only LoRA at matched parameters")


def lora_batch_sensitive(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    lora = _diff(_fig(a.get("lora-default"), "learning"), _fig(a.get("lora-large"), "learning"))
    full = _diff(_fig(a.get("full-default"), "learning"), _fig(a.get("full-large"), "learning"))
    return _verdict_of(_diff(lora, full), "learning lost at 4x batch: LoRA's loss - full's loss")


def rank_helps(r: dict[str, Any]) -> dict[str, Any]:
    ranks = sorted(
        (int(n.removeprefix("lora-r")), arm) for n, arm in _arms(r).items() if n.startswith("lora-r")
    )
    if len(ranks) < 2:
        return _verdict_of(None, "learning highest - lowest rank")
    (low, a), (high, b) = ranks[0], ranks[-1]
    return _verdict_of(_diff(b["learning"], a["learning"]), f"learning rank {high} - rank {low}")


def lora_gap_grows_with_data(r: dict[str, Any]) -> dict[str, Any]:
    a = _arms(r)
    low = sorted(n for n in a if n.startswith("lora-r") and n.endswith("-1pct"))
    if not low:
        return _verdict_of(None, "full - LoRA learning gap at 100% minus at 1% of the data")
    rank = low[0].split("-")[1]

    def gap(pct: str) -> dict[str, Any] | None:
        return _diff(_fig(a.get(f"full-{pct}"), "learning"), _fig(a.get(f"lora-{rank}-{pct}"), "learning"))

    return _verdict_of(
        _diff(gap("100pct"), gap("1pct")), f"full - LoRA ({rank}) learning gap at 100% minus at 1%"
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
        lambda r: _verdict_of(None, "needs the rl study"),
        note="the rl study is not part of this build",
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


def write_findings(data: dict[str, Any], path: str | Path, header: str = "") -> Path:
    """docs/findings.md from findings.json: each finding, its verdict per comparison, with numbers and CIs."""
    lines = [
        "# Findings: what adaptlab measured of the published claims",
        "",
        header
        or "Written by `adaptlab reproduce` from its findings.json. Verdicts: agrees / disagrees when the 95% "
        "interval of the measured difference lies on one side of zero, inconclusive when it straddles it.",
        "",
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
