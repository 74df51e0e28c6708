"""Benchmark `adaptlab runs` on N synthetic run directories: first index, then listings from the index.

Writes N run directories (config.yaml, metrics.jsonl of 50 rows, summary.json, eval.json on every
third, a corrupt summary.json on every hundredth) plus a comparison folder, then times the whole
command `python -m adaptlab runs ROOT --json` in a fresh process (interpreter start and imports
included): once to build the index, then three more times from it (median), then once with
--where and --sort, then after 10 runs changed (re-read only those). The index lives in a temporary
ADAPTLAB_CACHE so the user's cache is untouched.

Prints a table and writes bench/results/runs_index.json.

    python bench/runs_index.py [--runs 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora", "qlora")


def write_run(path: Path, i: int) -> None:
    """One synthetic finished run directory, shaped as `adaptlab train` writes it."""
    path.mkdir(parents=True)
    method = METHODS[i % len(METHODS)]
    (path / "config.yaml").write_text(
        f"model:\n  name: tiny-random\nmethod:\n  method: {method}\n  rank: {4 << (i % 3)}\n"
        f"data:\n  train: [python-stdlib]\ntrain:\n  steps: 50\n  lr: {1e-4 * (1 + i % 5)}\nout: {path}\n"
    )
    rows = [
        {
            "step": s,
            "tokens": 512 * s,
            "loss": 5.0 / s,
            "lr": 1e-4,
            "mem_bytes": 10**9 + i,
            "elapsed_s": 0.1 * s,
        }
        for s in range(1, 51)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "method": method,
        "base_model": "tiny-random",
        "tokens_seen": 25600,
        "steps": 50,
        "final_train_loss": 0.1,
        "final_val_loss": 0.2 + i * 1e-4,
        "peak_mem_bytes": 10**9 + i,
        "wall_s": 5.0 + i % 7,
    }
    text = json.dumps(summary)
    (path / "summary.json").write_text(text[:20] if i % 100 == 99 else text)
    if i % 3 == 0:
        ev = {"target": {"delta": {"nll": -0.01 * (i % 10)}}, "general": {"delta": {"nll": 0.01 * (i % 9)}}}
        (path / "eval.json").write_text(json.dumps(ev))


def timed(root: Path, env: dict[str, str], *extra: str) -> tuple[float, list[dict]]:
    cmd = [sys.executable, "-m", "adaptlab", "runs", str(root), "--json", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "runs", Path(tmp) / "cache"
        for i in range(args.runs):
            write_run(root / f"group-{i // 100}" / f"run-{i}", i)
        env = {**os.environ, "ADAPTLAB_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
        first, records = timed(root, env)
        warm = [timed(root, env)[0] for _ in range(3)]
        filtered_s, filtered = timed(root, env, "--where", "forgetting<0.05", "--sort", "-learning")
        for i in range(10):
            p = root / f"group-{i // 100}" / f"run-{i}" / "metrics.jsonl"
            p.write_text(p.read_text() + json.dumps({"step": 51, "tokens": 1, "loss": 0.01}) + "\n")
        changed_s, _ = timed(root, env)
    result = {
        "runs": args.runs,
        "listed": len(records),
        "corrupt": sum(r["status"] == "corrupt" for r in records),
        "first_index_s": first,
        "from_index_median_s": statistics.median(warm),
        "filtered_sorted_s": filtered_s,
        "filtered_rows": len(filtered),
        "after_10_changed_s": changed_s,
        "python": sys.version.split()[0],
    }
    print(f"{'measure':<28}{'value':>12}")
    for key, value in result.items():
        print(f"{key:<28}{value:>12.3f}" if isinstance(value, float) else f"{key:<28}{value!s:>12}")
    out = REPO / "bench" / "results" / "runs_index.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
