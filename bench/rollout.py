"""Benchmark GRPO's sampling phase on smollm2-135m: adaptlab's sampler vs transformers' generate.

A GRPO step first samples `--group-size` completions of each of its prompts (`adaptlab.sampling.sample`,
over the model as `adaptlab train --task grpo` holds it: LoRA's base held in bf16 at bf16, the fused
LoRA Linears); the reference is what a plain transformers + PEFT loop (TRL's GRPOTrainer without vLLM)
runs: `model.generate(do_sample=True, num_return_sequences=G)` over the fp32 model (+ peft's LoRA,
r=16, alpha 32, all-linear) under the same autocast. Both decode the same prompts of the embedded
arithmetic task (4 a step by default) at temperature 1 for exactly --max-new-tokens tokens (end tokens
ignored on both sides), so both produce the same number of tokens. Both run in one process, their
rollouts alternating (adaptlab first on even repeats, the reference on odd ones), so drift in the
machine's speed hits both alike; the first repeat of each is a warm-up. tokens/s is rows x new tokens
over the median time. On a machine with a CUDA GPU both run there (the device synchronised around each
rollout); the random-weight shapes of bench/train_step.py are not wired in here.

Prints a table and writes bench/results/rollout.json.

    python bench/rollout.py [--methods lora,full] [--precisions bf16,fp32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adaptlab.hardware import cpu_has_native_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"
RANK = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where adaptlab's training puts the model


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _adaptlab_model(model: str, method: str, precision: str, tmp: Path) -> tuple[Any, list[list[int]]]:
    """The policy as GRPO training holds it, and the prompts' token ids."""
    from adaptlab.config import RunConfig
    from adaptlab.train import prepare

    lora = {"rank": RANK, "alpha": 2 * RANK, "targets": "all-linear"} if method != "full" else {}
    config = RunConfig(
        model={"name": model},
        method={"method": method, **lora},
        objective={"task": "grpo"},
        data={"train": ["arithmetic"]},
        out=str(tmp / method),
        train={"steps": 1, "precision": precision},
    )
    setup = prepare(config)
    return setup.model, [example.ids for example in setup.train_examples]


def _reference_model(model: str, method: str) -> Any:
    """The plain loop's policy: the fp32 model, with peft's LoRA for the LoRA family."""
    from transformers import AutoModelForCausalLM

    from adaptlab.models import local_dir

    ref = AutoModelForCausalLM.from_pretrained(str(local_dir(model) or model), torch_dtype=torch.float32)
    if method == "full":
        return ref
    from peft import LoraConfig, get_peft_model

    return get_peft_model(ref, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear"))


def _adaptlab_rollout(model: Any, prompts: list[list[int]], args: argparse.Namespace, seed: int) -> None:
    from adaptlab.sampling import sample

    sample(
        model,
        prompts,
        n=args.group_size,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        eos_ids=set(),  # every row decodes max_new_tokens, as the reference does
        pad_id=0,
        generator=torch.Generator().manual_seed(seed),
    )


def _reference_rollout(model: Any, prompts: list[list[int]], args: argparse.Namespace, seed: int) -> None:
    from adaptlab.sampling import left_pad

    ids, mask = left_pad(prompts, 0)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,  # no early end: the same tokens as adaptlab's side
        num_return_sequences=args.group_size,
        pad_token_id=0,
    )
    assert out.shape[1] == ids.shape[1] + args.max_new_tokens


def run_case(method: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ours, prompts = _adaptlab_model(args.model, method, precision, Path(tmp))
        prompts = prompts[: args.prompts]
        ref = _reference_model(args.model, method).to(next(ours.parameters()).device)
        ours.eval()
        ref.eval()
        times: dict[str, list[float]] = {"adaptlab": [], "reference": []}
        sides = {"adaptlab": (_adaptlab_rollout, ours), "reference": (_reference_rollout, ref)}
        for rep in range(args.repeats + 1):
            order = ("adaptlab", "reference") if rep % 2 == 0 else ("reference", "adaptlab")
            for side in order:
                fn, model = sides[side]
                _sync()
                t0 = time.perf_counter()
                with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    fn(model, prompts, args, seed=rep)
                _sync()
                if rep:  # the first repeat warms up
                    times[side].append(time.perf_counter() - t0)
    tokens = len(prompts) * args.group_size * args.max_new_tokens
    row: dict[str, Any] = {"method": method, "precision": precision, "tokens": tokens}
    for side, ts in times.items():
        row[side] = {
            "median_s": statistics.median(ts),
            "times_s": ts,
            "tokens_per_s": tokens / statistics.median(ts),
        }
    row["speed"] = row["adaptlab"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--precisions", default="bf16,fp32" if cpu_has_native_bf16() else "fp32")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed rollouts per side (after one warm-up)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    print(
        f"{args.model}, {args.prompts} prompts x {args.group_size} completions x {args.max_new_tokens} tokens"
    )
    print(f"{'method':6s} {'prec':4s} {'adaptlab tok/s':>15s} {'reference tok/s':>16s} {'speed':>6s}")
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            row = run_case(method, precision, args)
            rows.append(row)
            print(
                f"{method:6s} {precision:4s} {row['adaptlab']['tokens_per_s']:15.1f} "
                f"{row['reference']['tokens_per_s']:16.1f} {row['speed']:6.2f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name()
        if DEVICE == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    args.out.write_text(
        json.dumps({**meta, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
