"""How close `adaptlab decide --dry-run` comes to the decision's real wall time, and whether the
decision ends within --time.

Runs `adaptlab decide ... --dry-run` (the estimate: from the planner's time model alone with
--no-calibration, the first estimate a fresh machine gives; without it, with whatever calibration
earlier decisions left in the plan cache), then the same decision for real in a fresh --out, timing
the whole command. Goal: the estimate within +-20% of the measured wall time, and the
wall time within 110% of --time. Prints a table and writes JSON.

    python bench/decide_estimate.py --model smollm2-135m --data python-stdlib --time 20m \
        --out bench/results/decide_estimate_avx512bf16.json
    python bench/decide_estimate.py --model tiny-random --time 3m --executor inline   # about 3 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adaptlab.decide.spec import parse_duration

ADAPTLAB = [sys.executable, "-m", "adaptlab"]


def _estimate_s(text: str) -> float:
    m = re.search(r"estimated .*?\((\d+) s\)", text)
    if not m:
        raise SystemExit(f"no estimate in the dry run's output:\n{text}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="python-stdlib")
    ap.add_argument("--time", default="20m")
    ap.add_argument("--executor", default="local")
    ap.add_argument("--no-calibration", action="store_true", help="the time model alone (a fresh machine)")
    ap.add_argument("--keep", help="keep the decision's directory here (default: a temp dir, removed)")
    ap.add_argument("--out", default="bench/results/decide_estimate.json")
    a = ap.parse_args()
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="decide-bench-")) / "decision"
    args = ["decide", "--model", a.model, "--data", a.data, "--time", a.time, "--executor", a.executor]
    args += ["--out", str(work)] + (["--no-calibration"] if a.no_calibration else [])
    dry = subprocess.run(ADAPTLAB + args + ["--dry-run"], capture_output=True, text=True, check=True)
    estimate = _estimate_s(dry.stdout)
    t0 = time.perf_counter()
    real = subprocess.run(ADAPTLAB + args, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - t0
    decision = json.loads((work / "decision.json").read_text()) if real.returncode == 0 else None
    limit = parse_duration(a.time)
    row = {
        "model": a.model,
        "data": a.data,
        "time": a.time,
        "executor": a.executor,
        "calibrated": not a.no_calibration,
        "dry_run": dry.stdout,
        "estimate_s": estimate,
        "wall_s": wall,
        "estimate_over_wall": estimate / wall,
        "within_20pct": abs(estimate / wall - 1) <= 0.20,
        "wall_over_time": wall / limit,
        "exit_code": real.returncode,
        "pick": decision["pick"] if decision else None,
        "reason": decision["reason"] if decision else real.stderr[-2000:],
    }
    print(f"{'model':14s} {'--time':>7s} {'estimate':>9s} {'wall':>8s} {'est/wall':>8s} {'pick':>6s}")
    print(
        f"{a.model:14s} {a.time:>7s} {estimate:8.0f}s {wall:7.0f}s {estimate / wall:8.2f} {row['pick'] or '-':>6s}"
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(row, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(work.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
