"""How close `adaptlab plan` comes to real training: peak memory and step time, full, LoRA and QLoRA.

Each arm trains a few steps through adaptlab.train.train in its own subprocess (so peak RSS is that
run's alone) on the shared legal corpus; the plan is computed for the same model, method and shape
with a fresh device micro-benchmark taken in the same session, so machine load hits both sides.
Step time is the median of the per-step deltas in metrics.jsonl, first step excluded. Goal: memory
within +-15%, time within +-30%.

    python bench/plan_accuracy.py                 # tiny-random and smollm2-135m at 2 x 128 (~10 min idle)
    python bench/plan_accuracy.py --shapes 2x128,4x256 --steps 4
    python bench/plan_accuracy.py --models smollm2-135m --shapes 4x256 --precisions fp32,bf16
    python bench/plan_accuracy.py --replan bench/results/plan_accuracy.json   # today's model, recorded runs
    python bench/plan_accuracy.py --replan FILE --remeasure   # ... and a fresh device micro-benchmark
    python bench/plan_accuracy.py --task grpo --kl-beta 0.05 --models smollm2-135m --shapes 4x256 \
        --methods full,lora --precisions bf16 --steps 3 --out bench/results/plan_accuracy_grpo_avx512bf16.json

--task grpo trains on the embedded arithmetic task (train's defaults: 8 completions a prompt, at most 32
new tokens; --kl-beta above 0 adds the KL reference) and plans it with `adaptlab plan --task grpo`: a
step is the sampling phase and the training phase, a shape's sequence length is the cap train gets. A
GRPO row is re-planned by `plan` itself with the row's own arguments (the device micro-benchmark cached
for them, or with --remeasure a fresh one), not from the row's recorded throughput.
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
DATA = REPO.parent / "shared" / "data" / "legal" / "spdx_licenses.jsonl"
RESULTS = REPO / "bench" / "results" / "plan_accuracy.json"

_CHILD = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from adaptlab.config import RunConfig
from adaptlab.train import train
model, method, batch, seq_len, steps, data, out, precision, dropout, task, kl_beta = sys.argv[1:12]
lora = {"rank": 16, "dropout": float(dropout)} if method != "full" else {}
objective = {"task": "grpo", "kl_beta": float(kl_beta)} if task == "grpo" else {}
cfg = RunConfig(model={"name": model}, method={"method": method, **lora}, objective=objective,
                data={"train": [data]}, out=out,
                train={"steps": int(steps), "batch": int(batch), "seq_len": int(seq_len), "eval_examples": 1,
                       "precision": precision})
summary = train(cfg)
rows = [json.loads(l) for l in open(out + "/metrics.jsonl") if '"loss"' in l]
elapsed = [r["elapsed_s"] for r in rows]
print("RESULT " + json.dumps({"summary": summary, "elapsed": elapsed}))
"""


def run_arm(
    model: str,
    method: str,
    batch: int,
    seq_len: int,
    steps: int,
    precision: str = "auto",
    dropout: float = 0.0,
    task: str = "cpt",
    kl_beta: float = 0.0,
) -> dict:
    data = "arithmetic" if task == "grpo" else str(DATA)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        cmd = [
            sys.executable,
            "-c",
            _CHILD,
            model,
            method,
            str(batch),
            str(seq_len),
            str(steps),
            data,
            out,
            precision,
            str(dropout),
            task,
            str(kl_beta),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{model} {method} failed: {proc.stderr[-2000:]}")
    got = json.loads(lines[-1][len("RESULT ") :])
    elapsed = got["elapsed"]
    deltas = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
    return {
        "peak_mem_bytes": got["summary"]["peak_mem_bytes"],
        "step_s": statistics.median(deltas) if deltas else elapsed[0],
        "step_deltas_s": [round(d, 3) for d in [elapsed[0], *deltas]],
        "precision": got["summary"]["precision"],
        "trainable_params": got["summary"]["trainable_params"],
        "artifact_bytes": got["summary"]["artifact_bytes"],
    }


def _print_row(row: dict) -> None:
    print(
        f"{row['model']:13s} {row['method']:5s} {row['precision']:4s} {row['batch']}x{row['seq_len']:<4d} mem "
        f"{row['measured_peak_mem_bytes'] / 2**20:7.0f} MiB plan {row['planned_peak_mem_bytes'] / 2**20:7.0f} "
        f"({100 * row['mem_error']:+5.1f}%)  step {row['measured_step_s']:7.2f} s plan "
        f"{row['planned_step_s']:7.2f} ({100 * row['time_error']:+5.1f}%)",
        flush=True,
    )


def _summary(rows: list[dict]) -> None:
    ok_mem = sum(abs(r["mem_error"]) <= 0.15 for r in rows)
    ok_time = sum(abs(r["time_error"]) <= 0.30 for r in rows)
    print(f"within +-15% memory: {ok_mem}/{len(rows)}; within +-30% time: {ok_time}/{len(rows)}")


def replan(path: Path, remeasure: bool = False) -> int:
    """Re-estimate recorded runs with the current model (no training); rewrite the file.

    Each run keeps its own device throughput unless `remeasure`: then the micro-benchmark is taken
    again now, once per precision and shape (for a run whose benchmark was disturbed, or a changed one).
    """
    from adaptlab.plan.arch import load_arch, targets_for
    from adaptlab.plan.estimate import Arm, Shape, memory_breakdown, step_time_at
    from adaptlab.plan.measure import (
        attention_throughput,
        device_throughput,
        dropout_throughput,
        runtime_baseline_bytes,
    )

    recorded = json.loads(path.read_text())
    rows = recorded["rows"]
    runtime = runtime_baseline_bytes()
    fresh: dict[tuple, dict] = {}
    for r in rows:
        if r.get("task") == "grpo":  # sampling and training phases: plan itself, with the row's arguments
            _replan_grpo(r, remeasure)
            continue
        arch = load_arch(r["model"])
        if remeasure:
            key = (
                r["precision"],
                *r["throughput"]["shape"],
                r["batch"],
                r["seq_len"],
                arch.n_heads,
                arch.head_dim,
            )
            if key not in fresh:
                fresh[key] = {
                    **device_throughput("cpu", key[0], *key[1:4], refresh=True),
                    **attention_throughput("cpu", key[0], *key[4:], refresh=True),
                    **(dropout_throughput("cpu", refresh=True) if r.get("dropout") else {}),
                }
            r["throughput"] = fresh[key]
        targets = tuple(targets_for(arch, "all-linear"))
        arm = Arm("full") if r["method"] == "full" else Arm(r["method"], 16, targets, r.get("dropout", 0.0))
        shape = Shape(r["batch"], r["seq_len"], 1, r["precision"], False, "cpu")
        mem = memory_breakdown(arch, arm, shape, runtime, r["planned_memory"]["data"])["peak"]
        step = step_time_at(arch, arm, shape, r["throughput"])["step_s"]
        r.update(
            planned_peak_mem_bytes=mem,
            mem_error=mem / r["measured_peak_mem_bytes"] - 1,
            planned_step_s=step,
            time_error=step / r["measured_step_s"] - 1,
        )
        _print_row(r)
    _summary(rows)
    path.write_text(json.dumps(recorded, indent=2))
    return 0


def _replan_grpo(row: dict, remeasure: bool) -> None:
    from adaptlab.plan import plan

    est = plan(**row["plan_args"], refresh=remeasure)
    m = est["methods"][row["method"]]
    row.update(
        planned_peak_mem_bytes=m["peak_mem_bytes"],
        mem_error=m["peak_mem_bytes"] / row["measured_peak_mem_bytes"] - 1,
        planned_step_s=m["step_s"],
        time_error=m["step_s"] / row["measured_step_s"] - 1,
        planned_memory=m["memory"],
        planned_time_breakdown_s=m["time_breakdown_s"],
        throughput=est["throughput"],
    )
    _print_row(row)


def _plan_args(model: str, batch: int, seq_len: int, args: argparse.Namespace, precision: str) -> dict:
    """`plan`'s arguments for one measured shape (keyword arguments, recorded in the row)."""
    common = {"model": model, "batch": batch, "seq_len": seq_len, "ranks": [16], "precision": precision}
    if args.task == "grpo":
        return {
            **common,
            "data": ["arithmetic"],
            "task": "grpo",
            "kl_beta": args.kl_beta,
            "dropout": args.dropout,
        }
    return {**common, "data": [str(DATA)], "tokens": args.steps * batch * seq_len, "dropout": args.dropout}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random,smollm2-135m")
    parser.add_argument("--shapes", default="2x128", help="comma list of BATCHxSEQ_LEN")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--precisions",
        default="auto",
        help="comma list of auto|fp32|bf16 (bf16 is emulated on avx2-only CPUs)",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout of the LoRA family's arms")
    parser.add_argument("--task", choices=("cpt", "grpo"), default="cpt", help="grpo: the arithmetic task")
    parser.add_argument(
        "--kl-beta", type=float, default=0.0, help="with --task grpo: the KL penalty's weight"
    )
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--replan", type=Path, help="re-estimate the runs recorded in this JSON, train nothing"
    )
    parser.add_argument(
        "--remeasure", action="store_true", help="with --replan: take the device micro-benchmark again now"
    )
    args = parser.parse_args(argv)
    if args.kl_beta and args.task != "grpo":
        parser.error("--kl-beta applies to --task grpo")
    if args.replan:
        return replan(args.replan, args.remeasure)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from adaptlab.plan import plan

    rows = []
    refreshed: set[tuple[str, str, str]] = set()
    for model in args.models.split(","):
        for shape in args.shapes.split(","):
            batch, seq_len = (int(x) for x in shape.split("x"))
            for method, precision in [
                (m, p) for p in args.precisions.split(",") for m in args.methods.split(",")
            ]:
                t0 = time.perf_counter()
                measured = run_arm(
                    model,
                    method,
                    batch,
                    seq_len,
                    args.steps,
                    precision,
                    args.dropout,
                    args.task,
                    args.kl_beta,
                )
                # re-measure the device right after the run, once per model/shape, so load hits both sides
                key = (model, shape, measured["precision"])
                plan_args = _plan_args(model, batch, seq_len, args, measured["precision"])
                est = plan(**plan_args, refresh=key not in refreshed)
                refreshed.add(key)
                m = est["methods"][method]
                row = {
                    "model": model,
                    "method": method,
                    "batch": batch,
                    "seq_len": seq_len,
                    "dropout": args.dropout,
                    "task": args.task,
                    "kl_beta": args.kl_beta,
                    "plan_args": plan_args,
                    "precision": measured["precision"],
                    "measured_peak_mem_bytes": measured["peak_mem_bytes"],
                    "planned_peak_mem_bytes": m["peak_mem_bytes"],
                    "mem_error": m["peak_mem_bytes"] / measured["peak_mem_bytes"] - 1,
                    "measured_step_s": measured["step_s"],
                    "planned_step_s": m["step_s"],
                    "time_error": m["step_s"] / measured["step_s"] - 1,
                    "measured_trainable": measured["trainable_params"],
                    "planned_trainable": m["trainable_params"],
                    "measured_artifact_bytes": measured["artifact_bytes"],
                    "planned_artifact_bytes": m["artifact_bytes"],
                    "step_deltas_s": measured["step_deltas_s"],
                    "planned_memory": m["memory"],
                    "planned_time_breakdown_s": m["time_breakdown_s"],
                    "throughput": est["throughput"],
                    "wall_s": time.perf_counter() - t0,
                }
                rows.append(row)
                _print_row(row)
    _summary(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"rows": rows, "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
