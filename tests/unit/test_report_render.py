"""The report renders from results.json alone: plots, Markdown with image links, self-contained HTML."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from test_report_recommend import arm, results

from adaptlab.report.recommend import recommend
from adaptlab.report.render import write_report


def _png(path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.savefig(path)


def _arm_with_run(out: Path, name: str, method: str, learning: float, forgetting: float) -> dict[str, Any]:
    a = arm(name, method, learning, forgetting)
    run = out / "runs" / name
    run.mkdir(parents=True)
    rows = [{"step": s, "tokens": 64 * s, "loss": 3.0 - 0.1 * s} for s in range(1, 9)]
    rows += [
        {"step": 4, "tokens": 256, "split": "val", "val_loss": 2.8},
        {"step": 8, "tokens": 512, "split": "val", "val_loss": 2.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _png(run / "intruders.png")
    a.update(
        runs=[{"run": name, "dir": f"runs/{name}", "seed": 0}],
        cost={
            "trainable_params": 1000 if method != "full" else 100000,
            "total_params": 100000,
            "peak_mem_bytes": 2e9,
            "wall_s": 30.0,
            "tokens_per_s": 500.0,
            "artifact_bytes": 10**6,
            "tokens_seen": 512,
        },
        final_val_loss=2.5,
        analysis={
            "k": 10,
            "eps": 0.5,
            "layers": 14,
            "intruders": 3,
            "layers_with_intruders": 2,
            "intruders_per_layer": 3 / 14,
            "rel_update_norm": 0.01,
            "mean_effective_rank": 4.0,
            "by_module_type": {"q": {"intruders": 3, "layers": 2, "rel_update_norm": 0.01}},
            "heatmaps": [f"runs/{name}/intruders.png"],
        },
    )
    return a


def test_report_embeds_every_image_and_links_them_in_markdown(tmp_path: Path) -> None:
    arms = [
        _arm_with_run(tmp_path, "full", "full", 0.5, 0.2),
        _arm_with_run(tmp_path, "lora", "lora", 0.3, 0.05),
    ]
    failed = {
        "name": "dora",
        "method": "dora",
        "status": "failed",
        "error": "dora: out of memory",
        "config": {},
    }
    res = results(
        *arms, failed, study="methods", model="tiny-random", budget_tokens=512, seeds=1, notes=["a note"]
    )
    res.update(
        data={
            "target": ["python-stdlib"],
            "general": [],
            "drift": True,
            "mc": [],
            "eval_docs": 8,
            "eval_max_chars": 100,
        },
        budget_note="every arm saw the same 512 tokens in the same order",
    )
    res["recommendation"] = recommend(res)
    paths = write_report(res, tmp_path)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    for text in (md, html):
        assert "Recommendation" in text and res["recommendation"]["pick_reason"].split(" (")[0] in text
        assert "dora: out of memory" in text and "a note" in text
    assert "![learning vs forgetting](plots/learning_forgetting.png)" in md
    assert "runs/lora/intruders.png" in md
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(images) == 4  # loss, scatter, two heatmaps
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    # Markdown tables keep one row per arm with the same number of cells as the header
    table = [line for line in md.splitlines() if line.startswith("| ") and "learning" not in line]
    cost_rows = [line for line in table if line.startswith("| full |") or line.startswith("| lora |")]
    assert cost_rows and len({line.count(" | ") for line in cost_rows[-2:]}) == 1
