"""`adaptlab compare` end to end on tiny-random: results.json, both reports, idempotence, a failing arm."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from helpers import write_corpus

GENERAL = [
    "The weather was mild and the market square filled with people buying bread and fruit.",
    "She wrote a long letter to her grandmother about the trip to the coast.",
    "Regular exercise and enough sleep help most people feel better during the day.",
    "The museum opened a new room about the history of the river and its bridges.",
    "He planted tomatoes in the spring and picked them at the end of the summer.",
    "A good budget lists income first, then fixed costs, then everything else.",
]


def _spec(tmp_path: Path) -> Path:
    data = write_corpus(tmp_path / "data", n_docs=30)
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"id": f"g{i}", "text": t}) + "\n" for i, t in enumerate(GENERAL)))
    spec = {
        "model": "tiny-random",
        "data": {"train": [str(data)], "val_frac": 0.1, "test_frac": 0.1},
        "general": [str(general)],
        "drift": True,
        "tokens": 256,
        "seeds": 1,
        "train": {
            "batch": 2,
            "seq_len": 32,
            "lr": 1e-3,
            "precision": "fp32",
            "eval_points": 2,
            "eval_examples": 4,
        },
        "eval": {
            "max_docs": 4,
            "max_chars": 600,
            "seq_len": 64,
            "batch": 4,
            "drift_prompts": 4,
            "drift_tokens": 8,
        },
        "analysis": {"k": 4},
        "arms": [
            {"name": "full", "method": "full"},
            {"name": "lora", "method": "lora", "rank": 4},
            {"name": "lora-attn", "method": "lora", "targets": "attention", "match_params": "lora"},
            {"name": "qlora", "method": "qlora", "rank": 4},
            {"name": "broken", "method": "lora", "targets": ["no_such_proj"]},
        ],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _figures_come_from_the_arms_evaluation(out: Path, arm: dict) -> None:
    """learning = -(tuned - base target NLL) with its interval negated; forgetting = general NLL delta."""
    ev = json.loads((out / arm["runs"][0]["dir"] / "eval.json").read_text())
    lo, hi = ev["target"]["delta"]["ci95"]
    assert arm["learning"]["value"] == pytest.approx(-ev["target"]["delta"]["nll"])
    assert arm["learning"]["ci95"] == pytest.approx([-hi, -lo])
    assert -hi < arm["learning"]["value"] < -lo  # a real interval around the estimate, not a point
    assert arm["forgetting"]["value"] == pytest.approx(ev["general"]["delta"]["nll"])
    assert arm["forgetting"]["ci95"] == pytest.approx(ev["general"]["delta"]["ci95"])


def _expected_verdict(arms: list[dict], metric: str, forgetting_metric: str) -> str:
    """The verdict of "LoRA learns less / forgets less", recomputed from the one matched pair: full and
    all-linear LoRA (attention-only LoRA has other targets, QLoRA another precision: never paired)."""
    from adaptlab.findings import decide
    from adaptlab.findings.paired import difference

    by = {a["name"]: a for a in arms}
    d = difference(by["full"], by["lora"], metric, forgetting_metric)
    assert d is not None and d["paired"]  # every arm keeps its per-document numbers
    return decide("superiority", d["ci95"])


def _mtimes(out: Path) -> dict[str, int]:
    files = [
        p for name in ("summary.json", "eval.json", "analysis.json") for p in (out / "runs").glob(f"*/{name}")
    ]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


def test_compare_end_to_end_then_idempotent(run_cli, tmp_path: Path) -> None:
    cfg, out = _spec(tmp_path), tmp_path / "out"
    code, stdout, err = run_cli("compare", "--config", cfg, "--out", out)
    assert code == 1, err  # one arm failed, the comparison still finished
    assert "broken: FAILED" in err and "no_such_proj" in err

    results = json.loads((out / "results.json").read_text())
    assert {"arms", "recommendation", "study", "budget_tokens", "notes"} <= set(results)
    by = {a["name"]: a for a in results["arms"]}
    assert by["broken"]["status"] == "failed" and "no_such_proj" in by["broken"]["error"]
    for name in ("full", "lora", "lora-attn", "qlora"):
        a = by[name]
        assert a["status"] == "ok"
        assert {"name", "method", "config", "learning", "forgetting", "cost", "analysis"} <= set(a)
        assert set(a["cost"]) >= {
            "trainable_params",
            "peak_mem_bytes",
            "wall_s",
            "tokens_per_s",
            "artifact_bytes",
        }
        _figures_come_from_the_arms_evaluation(out, a)
        assert a["forgetting"]["metric"] == "general_nll"
        assert a["forgetting"]["drift"]["value"] >= 0
        assert (out / a["runs"][0]["dir"] / "summary.json").exists()
        assert a["cost"]["tokens_seen"] == by["full"]["cost"]["tokens_seen"]  # equal budget
        assert a["analysis"]["layers"] > 0
    assert by["full"]["cost"]["trainable_params"] > by["lora"]["cost"]["trainable_params"]
    # attention-only rank raised so its trainable params come close to all-linear's
    assert by["lora-attn"]["config"]["rank"] > 4
    assert abs(by["lora-attn"]["cost"]["trainable_params"] / by["lora"]["cost"]["trainable_params"] - 1) < 0.2
    # QLoRA's figures are split into the 4-bit base alone and the adapter on top, in a note
    q = by["qlora"]["quantized_base"]
    lo, hi = q["learning"]["ci95"]
    assert lo < q["learning"]["value"] < hi and q["learning"]["value"] != by["qlora"]["learning"]["value"]
    assert "general_nll" in q
    note = next(n for n in results["notes"] if n.startswith("qlora is measured"))
    assert f"{by['qlora']['learning']['value'] - q['learning']['value']:.4f}" in note
    rec = results["recommendation"]
    assert rec["pick"] in by and set(rec["frontier"]) <= set(by)
    findings = {f["id"]: f for f in rec["findings"]}
    ok = [a for a in results["arms"] if a["status"] == "ok"]
    for fid, metric in (("learns_less", "learning"), ("forgets_less", "forgetting")):
        assert findings[fid]["verdict"] == _expected_verdict(ok, metric, results["forgetting_metric"]), (
            findings[fid]
        )
        assert findings[fid]["pairs"] == [["full", "lora"]]
    assert rec["summary"].splitlines()[0] in stdout

    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "## Cost" in md and "plots/learning_forgetting.png" in md
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) >= 2 + 2 * 4  # loss, scatter, two heatmaps per analysed arm
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert str(out) not in html  # self-contained: no file paths to images

    before = _mtimes(out)
    assert len(before) == 12
    code, _, err = run_cli("compare", "--config", cfg, "--out", out)
    assert code == 1
    assert err.count("finished earlier, skipped") == 4
    started = [line for line in err.splitlines() if ": training," in line]
    assert started and all("broken" in line for line in started)  # only the failed arm is tried again
    assert _mtimes(out) == before
