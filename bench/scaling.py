"""Benchmark one run on 1 vs N processes: `adaptlab train` vs `adaptlab train --nproc N --parallel P`.

On CPU, N processes share the machine's cores (torchrun gives each one thread, one process alone
uses them all), so this measures the cost of the distributed path (gloo all-reduces, FSDP2 gathers)
more than a speed-up; on a machine with N GPUs it is the real scaling. The global batch is the same
in every config (batch x grad-accum, split over the ranks), so every config takes the same steps.
Throughput is the median of the per-step tokens/s in metrics.jsonl over every step but the first
(warm-up); scaling efficiency = tokens/s at N / (N x tokens/s at 1).

Prints a table and writes bench/results/scaling.json.

    python bench/scaling.py [--model smollm2-135m] [--method lora] [--nproc 2] [--parallel ddp,fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"


def small_corpus(tmp: Path, n_docs: int = 80) -> Path:
    """The first 8,000 characters of n_docs standard-library modules: enough blocks, quick to tokenize."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 8000)[:n_docs]
    out = tmp / "corpus.jsonl"
    out.write_text("".join(json.dumps({"id": f.name, "text": f.read_text()[:8000]}) + "\n" for f in files))
    return out


def run(args: argparse.Namespace, nproc: int, parallel: str | None, out: Path) -> dict[str, Any]:
    """One `adaptlab train` (under --nproc when nproc > 1); its throughput, wall time and peak memory."""
    cmd = [
        sys.executable,
        "-m",
        "adaptlab",
        "train",
        "--quiet",
        "--model",
        args.model,
        "--method",
        args.method,
    ]
    cmd += ["--data", args.data, "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--grad-accum", str(args.grad_accum), "--seq-len", str(args.seq_len), "--out", str(out)]
    cmd += ["--precision", args.precision]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--parallel", parallel or "ddp"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tps = [r["tokens_per_s"] for r in rows if "loss" in r][1:]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "nproc": nproc,
        "parallel": parallel,
        "tokens_per_s": statistics.median(tps),
        "step_tokens": args.batch * args.grad_accum * args.seq_len,
        "wall_s": wall,
        "peak_mem_bytes_rank0": summary["peak_mem_bytes"],
        "final_train_loss": summary["final_train_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--data", default=None, help="training data (default: 80 stdlib modules, cut)")
    parser.add_argument(
        "--nproc", type=int, default=None, help="processes to compare with 1 (default: GPUs or 2)"
    )
    parser.add_argument("--parallel", default="ddp,fsdp", help="strategies at N processes, comma separated")
    parser.add_argument("--steps", type=int, default=6, help="steps per config, the first one untimed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    nproc = args.nproc or (gpus if gpus > 1 else 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.data = args.data or str(small_corpus(Path(tmp)))
        one = run(args, 1, None, Path(tmp) / "one")
        rows.append({**one, "efficiency": 1.0})
        for parallel in args.parallel.split(","):
            r = run(args, nproc, parallel, Path(tmp) / parallel)
            rows.append({**r, "efficiency": r["tokens_per_s"] / (nproc * one["tokens_per_s"])})
    print(
        f"{args.model} {args.method}, global batch {args.batch}x{args.grad_accum}x{args.seq_len}, {args.precision}"
    )
    print(f"{'processes':>9} {'parallel':>8} {'tokens/s':>9} {'efficiency':>10} {'wall s':>7} {'loss':>8}")
    for r in rows:
        print(
            f"{r['nproc']:>9} {r['parallel'] or '-':>8} {r['tokens_per_s']:>9.0f} {r['efficiency']:>10.2f} "
            f"{r['wall_s']:>7.1f} {r['final_train_loss']:>8.4f}"
        )
    device = (
        torch.cuda.get_device_name(0) if gpus else f"{platform.processor() or 'cpu'} x {os.cpu_count()} cores"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: str(v) for k, v in vars(args).items()}, "device": device, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
