"""The RL study on a CPU: GRPO with LoRA ranks 1, 4, 16 (all-linear, alpha 32) vs full fine-tuning on
smollm2-135m and the embedded arithmetic task, at matched episodes; accuracy and drift per arm.

It runs adaptlab.compare.rl.run_study (what `adaptlab compare --study rl` runs) at a size that fits a
2-core CPU in about 15 minutes: few steps, short completions, 60 held-out prompts. Prints the
Markdown table and writes bench/results/rl_study.json (the run directories go to a temp dir).

    python bench/rl_study.py [--steps 6] [--eval-prompts 60] [--study rl|sft-vs-rl] [--seeds 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from adaptlab.compare.rl import RLStudy, run_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="rl", choices=["rl", "sft-vs-rl"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=60)
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="Replicates per arm (1 fits the CPU budget; reported unreplicated).",
    )
    parser.add_argument("--out", help="Keep the study directory here (default: a temp dir).")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    study = RLStudy(
        study=args.study,
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        eval_prompts=args.eval_prompts,
        drift_tokens=32,
        full_lr=args.full_lr,
        seeds=args.seeds,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "study"
        results = run_study(
            study, out, on_event=lambda msg: print(f"[{time.perf_counter() - start:6.0f}s] {msg}")
        )
        report = (out / "report.md").read_text()
    results["wall_s"] = time.perf_counter() - start
    print(report)
    print(f"wall time {results['wall_s']:.0f} s")
    dest = Path(__file__).parent / "results" / f"{args.study.replace('-', '_')}_study.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
