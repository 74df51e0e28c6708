"""Running a reproduction: every comparison run, or reused from the evidence folder or OUT, then judged;
OUT/findings.json holds the verdicts and what each comparison was measured with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptlab import outputs
from adaptlab.errors import StudyRefused
from adaptlab.reproduce.judging import judge
from adaptlab.reproduce.planning import Comparison
from adaptlab.rundir import atomic_write

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
