"""`adaptlab reproduce`: run the studies that test the published findings, and write docs/findings.md.

Each finding (FINDINGS) is a published claim (findings/claims.py: its contrast, test and margin) and
the studies whose results test it; findings.verdict judges it on each such comparison's results.json:
agrees / disagrees / cannot tell / not run, the same function the comparison's own report uses. The
studies run on the model (default smollm2-135m) with two target domains; the forgetting finding is
repeated on the healed base (healed.py), so "full fine-tuning forgets less" can be told from "full
fine-tuning repairs the quantized base". Every comparison lives in OUT/<domain>/<study>/ and is reused
when finished (compare() itself skips finished runs and cached evaluations), so an interrupted
reproduce resumes. OUT/findings.json holds every verdict with its numbers; write_findings() renders it
as Markdown.

    adaptlab reproduce --data-root ../shared/data --out repro            # ~ hours on 2 CPU cores
    adaptlab reproduce --data-root ../shared/data --out repro --dry-run  # the plan and its estimate
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptlab import outputs
from adaptlab.config import COMPARE_SEEDS, EVAL_DOCS
from adaptlab.errors import StudyRefused, UserError
from adaptlab.findings import Claim, claims, verdict
from adaptlab.healed import RECIPES
from adaptlab.rundir import atomic_write

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


EVIDENCE = "docs/findings"
"""Where a reproduction keeps the evidence of its verdicts, beside docs/findings.md: per comparison its
results.json and the settings it was measured with (spec.json), small JSON files to commit as they
come. `--judge-only` judges what is there, so docs/findings.md is regenerated from it byte for byte,
and a reproduction spanning several sittings reuses every comparison already kept with its settings."""


def run(
    comparisons: list[Comparison],
    out: str | Path,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    executor: Any = None,
    judge_only: bool = False,
    overwrite: bool = False,
    evidence: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or reuse) every comparison, then judge every finding; write OUT/findings.json.

    OUT is claimed and locked first (adaptlab.outputs), as a comparison's folder is: a folder holding
    files adaptlab did not write is refused unless `overwrite`, and even then none of them is replaced.
    evidence (EVIDENCE): a comparison kept there with the same settings is reused, and each comparison
    that finishes is kept there. judge_only: run nothing; judge what the evidence holds (whatever its
    settings), else OUT/<key>/results.json (the others' findings read "not run"). A comparison whose
    study refuses its settings (StudyRefused) is not run: its line is said and kept in findings.json,
    and the other comparisons go on."""
    out = Path(out)
    with outputs.owned(out, "reproduction", overwrite=overwrite):
        return _run(comparisons, out, on_event, executor, judge_only, Path(evidence) if evidence else None)


def _run(
    comparisons: list[Comparison],
    out: Path,
    on_event: Callable[[dict[str, Any]], None] | None,
    executor: Any,
    judge_only: bool,
    evidence: Path | None,
) -> dict[str, Any]:
    from adaptlab.compare import build_spec, compare

    results: dict[str, dict[str, Any]] = {}
    refused: dict[str, str] = {}
    say = on_event or (lambda e: None)
    for c in comparisons:
        if (kept := _kept(evidence, c, same_settings=not judge_only)) is not None:
            results[c.key] = kept
            continue
        if judge_only:
            path = out / c.key / "results.json"
            if path.exists():
                results[c.key] = json.loads(path.read_text())
            continue
        say({"event": "comparison", "key": c.key})
        if c.study == "rl":
            results[c.key] = _run_rl(c, out / c.key, say)
        else:
            spec = build_spec(c.spec, source=c.key)
            try:
                results[c.key] = compare(spec, out / c.key, on_event=on_event, report=True, executor=executor)
            except StudyRefused as err:
                refused[c.key] = str(err)
                say({"event": "message", "text": f"{c.key}: not run: {err}"})
        if c.key in results and evidence is not None:
            _keep(evidence, c, results[c.key])
    data = {
        "comparisons": [
            {
                "key": c.key,
                "study": c.study,
                "domain": c.domain,
                "model": c.spec["model"],
                "tokens": c.spec.get("tokens"),
                "finished": c.key in results,
                **(_measured_with(results[c.key]) if c.key in results else {}),
                **({"refused": refused[c.key]} if c.key in refused else {}),
            }
            for c in comparisons
        ]
    }
    data["findings"] = judge(comparisons, results)
    (out / "findings.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def _settings(c: Comparison) -> Any:
    return json.loads(json.dumps(c.spec, sort_keys=True, default=str))


def _kept(evidence: Path | None, c: Comparison, same_settings: bool) -> dict[str, Any] | None:
    """Comparison c's results from the evidence folder (only when measured with c's settings, if asked)."""
    if evidence is None:
        return None
    folder = evidence / c.key
    try:
        if same_settings and json.loads((folder / "spec.json").read_text()) != _settings(c):
            return None
        return json.loads((folder / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _keep(evidence: Path, c: Comparison, results: dict[str, Any]) -> None:
    """Comparison c's results and settings into the evidence folder, each file written whole."""
    folder = evidence / c.key
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("spec.json", _settings(c)), ("results.json", results)):
        atomic_write(folder / name, json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")


def _measured_with(results: dict[str, Any]) -> dict[str, Any]:
    """What a comparison's verdicts rest on, read from its results: seeds, held-out documents, each arm's
    LR and where it came from (swept or a default)."""
    arms = [a for a in results.get("arms", []) if isinstance(a, dict)]
    docs = [a.get("learning", {}).get("docs") for a in arms if isinstance(a.get("learning"), dict)]
    lrs = {
        a["name"]: [a.get("config", {}).get("lr", a.get("lr")), a.get("config", {}).get("lr_source")]
        for a in arms
        if "name" in a
    }
    held_out = max((d for d in docs if isinstance(d, int)), default=None) or results.get("base", {}).get("n")
    return {"seeds": results.get("seeds", 1), "held_out": held_out, "lrs": lrs}


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


@dataclass(frozen=True)
class Finding:
    """A published claim (findings/claims.py) and the studies of the reproduction whose results test it."""

    claim: Claim
    study: str  # which comparison's results it reads
    also: tuple[str, ...] = ()  # other studies whose results hold the arms it compares

    @property
    def id(self) -> str:
        return self.claim.id


FINDINGS = [
    Finding(claims.LEARNS_LESS, "methods"),
    Finding(claims.FORGETS_LESS, "methods"),
    Finding(claims.FORGETS_LESS_HEALED, "healed"),
    Finding(claims.LR_RATIO, "lr"),
    Finding(claims.TARGETS, "targets", also=("methods",)),
    Finding(claims.BATCH, "batch"),
    Finding(claims.RANK, "rank"),
    Finding(claims.DATA_SIZE, "data-size"),
    Finding(claims.INTRUDERS, "methods"),
    Finding(claims.QLORA, "methods"),
    Finding(claims.REGIME, "regime"),
    Finding(claims.CONTINUAL, "continual"),
    Finding(claims.RANK1_RL, "rl"),
]
ROW_KEYS = (
    "verdict",
    "verdict_text",
    "value",
    "ci95",
    "margin",
    "pairs",
    "n_seeds",
    "n_docs",
    "unreplicated",
    "detail",
)


def _overall(verdicts: set[str]) -> str:
    """Across comparisons: the one verdict they share, "mixed" when they differ (not-run rows aside)."""
    ran = verdicts - {"not run"}
    if not ran:
        return "not run"
    return next(iter(ran)) if len(ran) == 1 else "mixed"


def judge(comparisons: list[Comparison], results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per finding: findings.verdict in each comparison that tests it, and overall."""
    out = []
    for f in FINDINGS:
        rows = []
        for c in comparisons:
            if (c.study == f.study or c.study in f.also) and c.key in results:
                v = verdict(f.claim, results[c.key]).to_dict()
                rows.append({"comparison": c.key, "domain": c.domain, **{k: v[k] for k in ROW_KEYS}})
        out.append(
            {
                "id": f.id,
                "claim": f.claim.claim,
                "source": f.claim.source,
                "study": f.study,
                "test": f.claim.test,
                "overall": _overall({r["verdict"] for r in rows}),
                "rows": rows,
                "note": f"needs {f.claim.contrast.needs}",
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
    measured = [f"- {_measured_line(c)}" for c in comparisons if c.get("finished", True) and "seeds" in c]
    return [" ".join(lines), "", *([*measured, ""] if measured else [])]


def _measured_line(c: dict[str, Any]) -> str:
    seeds = c["seeds"]
    lrs = ", ".join(
        f"{arm} {lr:g}" + (f" ({source})" if source else "")
        for arm, (lr, source) in sorted(c.get("lrs", {}).items())
        if isinstance(lr, (int, float))
    )
    return (
        f"`{c['key']}`: {seeds} seed{'s' if seeds != 1 else ' (unreplicated)'}, "
        f"{c.get('held_out') or '?'} held-out documents or prompts" + (f"; LRs: {lrs}" if lrs else "") + "."
    )


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
        or "Written by `adaptlab reproduce` from the evidence it keeps in docs/findings/ (each comparison's "
        "results.json and settings); `adaptlab reproduce --data-root ../shared/data --out DIR --judge-only` "
        "writes this file again from that evidence, byte for byte. Each claim's contrast is pooled over arms "
        "matched on every factor but the one under test, with its 95% interval paired over the same held-out "
        "documents and seeds. Superiority agrees / disagrees when the interval lies wholly on the claimed / "
        "the other side of zero; non-inferiority agrees when it stays above -margin; equivalence agrees only "
        "when it lies inside +-margin; anything else cannot tell. One seed is unreplicated.",
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
                f"| {ci} | {r.get('verdict_text') or r['verdict']} |"
            )
    sources = sorted({s for f in data["findings"] for s in f["source"].split("; ")})
    lines += ["", "Sources: " + "; ".join(sources) + ".", ""]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
