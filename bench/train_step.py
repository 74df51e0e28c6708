"""Benchmark one training step on smollm2-135m: adaptlab's loop vs a plain transformers + peft loop.

--model takes another embedded model, a local model directory, or a random-weight shape built once
(bench/random_model.py: random-1b, a ~1B Llama shape, for throughput beyond the embedded models).
Every row states its MFU: the step's training FLOPs (as `adaptlab plan` counts them: 6N for full
fine-tuning, 4N plus the adapters for the LoRA family, causal attention) per second over the device's
peak, its data-sheet dense peak on a known GPU, else the measured rate of a large trained Linear.

Arms: full fine-tuning, LoRA (r=16, alpha 32, all-linear; --dropout sets its dropout in both loops) and QLoRA (the same LoRA on an NF4 base,
double quantization, blocksize 64), and DoRA (the same LoRA with PEFT's use_dora) with --only, each at fp32 and under bf16 autocast, at batch 4 x 256 (4 x 128
with --quick). Each (loop, method, precision) runs in its own subprocess, so peak memory (the
process peak RSS on CPU, torch's peak allocated memory on CUDA) is that config's alone. The first
step is a warm-up and is not timed; tokens/s is the median over the timed steps.

On CPU, glibc's heap keeps much of what a step frees (hundreds of MB, varying from run to run), so
the peak RSS of small models says as much about the allocator as about the method. Each config is
therefore run a second time with MALLOC_MMAP_THRESHOLD_=65536, under which every freed block of
64 KiB or more goes back to the system at once: that run's peak RSS is the live peak (`live MB`),
what the method itself needs. It is not timed (the extra page faults slow it down 1.5x). --no-live
skips it.

- adaptlab: `adaptlab.train.train` itself (data packing, the loop, the summary), its per-step
  tokens_per_s from metrics.jsonl and peak_mem_bytes from summary.json.
- adaptlab+compile (with --compile): the same with `train.compile` (each decoder layer under
  torch.compile); its warm-up step includes the compilation.
- reference: AutoModelForCausalLM (+ peft get_peft_model; QLoRA through transformers'
  BitsAndBytesConfig), `model(input_ids, labels=...)` loss, torch AdamW, the same token blocks.

With --reference-base bf16 the plain loop loads the LoRA family's base in bf16 at bf16 (the whole model,
as `torch_dtype=torch.bfloat16` does; PEFT keeps its adapters in fp32): the plain loop as many run it,
which adaptlab's loop does not match in numerics (its embeddings, norms and residual stream stay fp32).

With --optimizer-in-backward adaptlab runs with `train.optimizer_in_backward` (each parameter updated
and its gradient freed inside backward) and neither loop clips gradients, which that mode cannot do.

Separate processes on a shared machine see different load, so single ratios vary by +-15%. With
--interleaved (speed only) both loops run in one process, their steps alternating (adaptlab first on
even steps, the reference first on odd ones; with --compile adaptlab+compile takes a third turn), so drift
in the machine's speed hits all alike. Each ratio comes with a 95% bootstrap interval over the timed
steps (resampled as back-to-back groups).

Prints a table and writes bench/results/train_step.json (--interleaved: train_step_interleaved.json).

    python bench/train_step.py [--quick] [--steps N] [--only lora,qlora] [--precisions fp32,bf16] [--profile] [--compile]
    python bench/train_step.py --interleaved --only full,lora,qlora --precisions fp32 --steps 7
    python bench/train_step.py --model random-1b --only lora --precisions bf16 --steps 5
    python bench/train_step.py --only lora --precisions bf16 --reference-base bf16
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from random_model import SHAPES, is_random, random_model_dir

from adaptlab.hardware import cpu_has_native_bf16

BASE = "smollm2-135m"
RANK = 16
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
INTERLEAVED_RESULTS = RESULTS.with_name("train_step_interleaved.json")
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "systems" / "man_pages.jsonl"
METHODS = ("full", "lora", "qlora")  # and "dora" with --only
LOOPS = ("reference", "adaptlab")


def _corpus(tmp: Path) -> Path:
    """Text for the step: man pages from ../shared/data when present, else standard-library source."""
    out = tmp / "corpus.jsonl"
    if CORPUS.is_file():
        out.write_text("".join(CORPUS.read_text().splitlines(keepends=True)[:200]))
    else:
        import sysconfig

        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(root.glob("*.py"))[:200]
        out.write_text("".join(json.dumps({"text": f.read_text()}) + "\n" for f in files))
    return out


def _lr(method: str) -> float:
    return 2e-5 if method == "full" else 2e-4


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration; with in_backward adaptlab updates in backward and neither loop clips."""

    model: str
    method: str
    precision: str
    batch: int
    seq_len: int
    steps: int
    in_backward: bool = False
    dropout: float = 0.0  # LoRA dropout, both loops
    reference_base: str = "fp32"  # the plain loop's load dtype for the LoRA family at bf16: fp32 | bf16

    @property
    def model_dir(self) -> Path:
        from adaptlab.models import local_dir

        path = random_model_dir(self.model) if is_random(self.model) else local_dir(self.model)
        if path is None:
            raise SystemExit(f"{self.model}: the benchmark needs an embedded model or a local directory")
        return path


def _config(case: Case, tmp: Path, compile: bool = False) -> Any:
    from adaptlab.config import build_config

    return build_config(
        {
            "model": {"name": str(case.model_dir)},
            "method": {"method": case.method, "rank": RANK, "targets": "all-linear", "dropout": case.dropout},
            "data": {"train": [str(_corpus(tmp))], "val_frac": 0.0, "test_frac": 0.0},
            "train": {
                "steps": case.steps,
                "batch": case.batch,
                "seq_len": case.seq_len,
                "precision": case.precision,
                "lr": _lr(case.method),
                "warmup": 0.0,
                "compile": compile,
                "optimizer_in_backward": case.in_backward,
            },
            "out": str(tmp / "run"),
        }
    )


def run_adaptlab(case: Case, tmp: Path, compile: bool = False) -> dict[str, Any]:
    from adaptlab.train import train

    summary = train(_config(case, tmp, compile))
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # first step is the warm-up
    return {
        "tokens_per_s": statistics.median(rates),
        "step_s": statistics.median(case.batch * case.seq_len / r for r in rates),
        "peak_mem_bytes": summary["peak_mem_bytes"],
        "trainable_params": summary["trainable_params"],
        "final_loss": summary["final_train_loss"],
    }


def profile_step(case: Case, tmp: Path, compile: bool = False, rows: int = 20) -> str:
    """torch.profiler table (self CPU time) of one adaptlab training step after two warm-up steps
    (with `compile`, of adaptlab+compile: the warm-up steps compile)."""
    from torch.profiler import ProfilerActivity, profile

    from adaptlab.train import build_optimizer, build_scheduler, prepare, train_step

    config = _config(Case(**{**asdict(case), "steps": 3}), tmp, compile)
    setup = prepare(config)
    setup.objective.prepare(setup)
    optimizer = build_optimizer(setup.params, config.train, _lr(case.method))
    scheduler = build_scheduler(optimizer, 3, config.train)
    for step in range(2):
        train_step(setup, setup.objective.micro_batches(setup, step), optimizer, scheduler)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step(setup, setup.objective.micro_batches(setup, 2), optimizer, scheduler)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


SPEC_PEAK_FLOPS = (  # dense, no sparsity: (name fragment, bf16, fp32 without TF32), first match wins
    ("H200", 989.4e12, 66.9e12),
    ("H100 PCIe", 756.0e12, 51.2e12),
    ("H100", 989.4e12, 66.9e12),
    ("A100", 312.0e12, 19.5e12),
)


def peak_flops(precision: str) -> tuple[float, str]:
    """The FLOP/s an MFU is taken against, and where it comes from.

    On a GPU in SPEC_PEAK_FLOPS, its data-sheet dense peak for the precision (the usual MFU). Elsewhere
    (CPUs have no agreed figure) the measured rate of a large trained Linear under the step's autocast,
    forward and both gradients (adaptlab.plan.measure), taken afresh at the start of each run (a shared
    machine's speed drifts; a cached figure from a loaded hour put MFUs above 100%): an MFU against what
    this machine's matmul reaches, so 1.0 is a step that is all matmul at that rate.
    """
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for fragment, bf16, fp32 in SPEC_PEAK_FLOPS:
            if fragment in name:
                return (bf16 if precision == "bf16" else fp32), f"{name} data sheet, dense {precision}"
    from adaptlab.plan.measure import device_throughput

    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 4096 if device == "cuda" else 2048
    rate = device_throughput(device, precision, size, size, size, refresh=True)["matmul_flops_per_s"]
    return rate, f"measured: a trained {size} x {size} Linear at {size} tokens, {precision}"


def flops_per_token(case: Case) -> float:
    """Training FLOPs a token needs, as `adaptlab plan` counts them: 6N (full) or 4N + 6 x adapter (LoRA,
    QLoRA), N the Linears' and the head's weights, plus causal attention (half of QK^T and AV)."""
    from adaptlab.plan.arch import load_arch, targets_for
    from adaptlab.plan.estimate import Arm
    from adaptlab.plan.estimate import flops_per_token as plan_flops

    arch = load_arch(str(case.model_dir))
    targets = () if case.method == "full" else tuple(targets_for(arch, "all-linear"))
    return plan_flops(arch, Arm(case.method, RANK, targets), case.seq_len)


def _blocks(tokenizer: Any, path: Path, batch: int, seq_len: int, steps: int) -> list[torch.Tensor]:
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids.extend(tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= steps * batch * seq_len:
            break
    t = torch.tensor(ids[: steps * batch * seq_len]).view(steps, batch, seq_len)  # (steps, B, T)
    return list(t)


def _reference(case: Case) -> tuple[Any, list[torch.nn.Parameter], Any, Any, torch.device]:
    """The plain loop's pieces: transformers model (+ peft adapter), its trainable parameters, AdamW, tokenizer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    method, precision = case.method, case.precision
    path = str(case.model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # --reference-base bf16: the plain loop loads the LoRA family's base in bf16 (embeddings and norms too,
    # as torch_dtype=bfloat16 does; PEFT keeps the adapters in fp32)
    half = case.reference_base == "bf16" and precision == "bf16" and method in ("lora", "dora")
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if half else torch.float32}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        )
        kwargs["device_map"] = str(device)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method != "full":
        config = LoraConfig(
            r=RANK,
            lora_alpha=2 * RANK,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
            use_dora=method == "dora",
            lora_dropout=case.dropout,
        )
        model = get_peft_model(model, config)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=_lr(method)), tokenizer, device


def _reference_step(
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: Any,
    ids: torch.Tensor,
    precision: str,
    clip: bool = True,
) -> tuple[float, float]:
    """One plain step: `model(input_ids, labels=...)` loss, backward, clip, AdamW; (seconds, loss)."""
    device = ids.device
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = float(out.loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, loss


def run_reference(case: Case, tmp: Path) -> dict[str, Any]:
    """The plain loop: transformers model, peft adapter, model(labels=...) loss, AdamW."""
    from adaptlab.hardware import peak_mem_bytes

    model, params, optimizer, tokenizer, device = _reference(case)
    times, loss = [], float("nan")
    for ids in _blocks(tokenizer, _corpus(tmp), case.batch, case.seq_len, case.steps):
        step = _reference_step(model, params, optimizer, ids.to(device), case.precision, not case.in_backward)
        seconds, loss = step
        times.append(seconds)
    timed = times[1:]  # first step is the warm-up
    return {
        "tokens_per_s": statistics.median(case.batch * case.seq_len / t for t in timed),
        "step_s": statistics.median(timed),
        "peak_mem_bytes": peak_mem_bytes(device),
        "trainable_params": sum(p.numel() for p in params),
        "final_loss": loss,
    }


def interleaved(case: Case, tmp: Path, compile: bool = False) -> dict[str, Any]:
    """The loops in one process, their steps alternating (the order rotating each step: adaptlab first on
    even steps, the reference on odd ones; with `compile` adaptlab+compile takes a third turn), so the
    machine's drift hits all alike: median step seconds of each and each adaptlab loop's speed ratio."""
    from adaptlab.optim_backward import BackwardUpdates
    from adaptlab.train import build_optimizer, build_scheduler, prepare, train_step

    def ours(out: Path, compiled: bool):
        out.mkdir()
        config = _config(case, out, compiled)
        setup = prepare(config)
        setup.objective.prepare(setup)
        optimizer = build_optimizer(setup.params, config.train, _lr(case.method))
        scheduler = build_scheduler(optimizer, case.steps, config.train)
        updates = BackwardUpdates(optimizer, setup.params.values()) if case.in_backward else None

        def step(i: int, ids: torch.Tensor) -> float:
            micro = setup.objective.micro_batches(setup, i)
            return train_step(setup, micro, optimizer, scheduler, updates).seconds

        return step

    loops = {"adaptlab": ours(tmp / "adaptlab", False)}
    if compile:
        loops["adaptlab+compile"] = ours(tmp / "compiled", True)
    model, params, ref_optimizer, tokenizer, device = _reference(case)

    def reference(i: int, ids: torch.Tensor) -> float:
        return _reference_step(
            model, params, ref_optimizer, ids.to(device), case.precision, not case.in_backward
        )[0]

    loops["reference"] = reference
    names = list(loops)  # the reference last
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, ids in enumerate(_blocks(tokenizer, _corpus(tmp), case.batch, case.seq_len, case.steps)):
        turn = i % len(names)
        for name in names[turn:] + names[:turn]:
            times[name].append(loops[name](i, ids))
    ref_s = statistics.median(times["reference"][1:])  # first step: warm-up (and compilation)
    result: dict[str, Any] = {"reference_step_s": ref_s, "reference_steps_s": times["reference"]}
    for name in names[:-1]:
        key = name.replace("+", "_")
        step_s = statistics.median(times[name][1:])
        result[f"{key}_step_s"] = step_s
        result[f"{key}_steps_s"] = times[name]
        ratio = ref_s / step_s
        result["speed_ratio" if name == "adaptlab" else f"{key}_speed_ratio"] = ratio
        result[f"{key}_speed_ratio_ci95"] = paired_ratio_ci(times["reference"][1:], times[name][1:])
    return result


def paired_ratio_ci(reference: list[float], ours: list[float], draws: int = 2000) -> list[float]:
    """95% bootstrap interval of median(reference) / median(ours) over the timed steps, resampling
    step indices so that the steps that ran back to back stay together (the machine's drift is shared)."""
    import random

    rng = random.Random(0)
    n = min(len(reference), len(ours))
    ratios = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(reference[i] for i in idx) / statistics.median(ours[i] for i in idx))
    ratios.sort()
    return [ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]]


def one(loop: str, case: Case) -> dict[str, Any]:
    """One loop (or both, interleaved) on one case, in a fresh temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        if loop == "reference":
            return run_reference(case, Path(tmp))
        if loop.startswith("interleaved"):
            return interleaved(case, Path(tmp), loop.endswith("compile"))
        if loop.startswith("profile"):
            return {"table": profile_step(case, Path(tmp), loop.endswith("compile"))}
        return run_adaptlab(case, Path(tmp), loop.endswith("compile"))


LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: freed blocks >= 64 KiB are unmapped at once


def _in_subprocess(
    loop: str, method: str, precision: str, args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", f"{loop},{method},{precision}"]
    cmd += ["--model", args.model, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    cmd += ["--steps", str(args.steps)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--optimizer-in-backward"] if args.optimizer_in_backward else []
    cmd += ["--dropout", str(args.dropout)] if args.dropout else []
    cmd += ["--reference-base", args.reference_base]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=BASE,
        help=f"an embedded model, a local model directory, or a random-weight shape ({', '.join(SHAPES)})",
    )
    parser.add_argument("--quick", action="store_true", help="batch 4 x 128 instead of 4 x 256")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=4, help="steps per config, the first one untimed")
    parser.add_argument("--only", default=",".join(METHODS), help="methods, comma separated")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--no-live", dest="live", action="store_false", help="skip the live-memory rerun on CPU"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per config (default: torch's)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a torch.profiler table of one adaptlab step per config",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also run adaptlab with train.compile (adaptlab+compile)"
    )
    parser.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="adaptlab with train.optimizer_in_backward; neither loop clips gradients",
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="speed only: both loops in one process, steps alternating (memory needs separate processes)",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout in both loops (default 0)")
    parser.add_argument(
        "--reference-base",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: the plain loop loads the LoRA family's base in bf16 at bf16 (embeddings and norms too)",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the JSON goes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_len = args.seq_len or (128 if args.quick else 256)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is an untimed warm-up)")
    from adaptlab.errors import UserError

    try:
        args.model_dir = _case(args, "full", "fp32").model_dir  # an unknown model: one line, exit 2
    except UserError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        loop, method, precision = args.one.split(",")
        print(json.dumps(one(loop, _case(args, method, precision))))
        return 0

    args.out = args.out or (INTERLEAVED_RESULTS if args.interleaved else RESULTS)
    if args.interleaved:
        return run_interleaved(args, argv)
    rows = []
    loops = (*LOOPS, "adaptlab+compile") if args.compile else LOOPS
    live = args.live and not torch.cuda.is_available()  # CUDA's peak allocated is live memory already
    header = (
        f"{'method':<6} {'prec':<5} {'loop':<16} {'tokens/s':>9} {'step s':>7} {'MFU':>6} {'peak MB':>8} "
        f"{'live MB':>8} {'speed':>6} {'mem':>6}"
    )
    print(
        f"{args.model}, batch {args.batch} x {args.seq_len}, {args.steps - 1} timed steps (median)\n{header}"
    )
    peaks = {}
    for precision in args.precisions.split(","):
        peaks[precision] = peak = peak_flops(precision)
        for method in args.only.split(","):
            per_token = flops_per_token(_case(args, method, precision))
            results = {loop: _in_subprocess(loop, method, precision, args) for loop in loops}
            for loop in loops if live else ():
                again = _in_subprocess(loop, method, precision, args, env=LIVE_ENV)
                if "error" not in again and "error" not in results[loop]:
                    results[loop]["live_peak_mem_bytes"] = again["peak_mem_bytes"]
            for loop in [name for name in loops if name != "reference"] if args.profile else ():
                prof = _in_subprocess(loop.replace("adaptlab", "profile"), method, precision, args)
                results[loop]["profile"] = prof.get("table", prof.get("error"))
                print(f"profile of one {loop} step, {method} {precision}:\n{results[loop]['profile']}")
            ref = results["reference"]
            for loop in loops:
                r = results[loop]
                row = {"method": method, "precision": precision, "loop": loop, **r}
                if "error" not in r:
                    row["flops_per_token"] = per_token
                    row["mfu"] = r["tokens_per_s"] * per_token / peak[0]
                if loop != "reference" and "error" not in ref and "error" not in r:
                    row["speed_ratio"] = r["tokens_per_s"] / ref["tokens_per_s"]
                    row["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
                rows.append(row)
                if "error" in r:
                    print(f"{method:<6} {precision:<5} {loop:<16} error: {r['error']}")
                    continue
                ratios = (
                    f"{row['speed_ratio']:>6.2f} {row['mem_ratio']:>6.2f}"
                    if "speed_ratio" in row
                    else f"{'':>6} {'':>6}"
                )
                live_mb = (
                    f"{r['live_peak_mem_bytes'] / 2**20:>8.0f}" if "live_peak_mem_bytes" in r else f"{'-':>8}"
                )
                print(
                    f"{method:<6} {precision:<5} {loop:<16} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} "
                    f"{row['mfu']:>6.1%} {r['peak_mem_bytes'] / 2**20:>8.0f} {live_mb} {ratios}",
                    flush=True,
                )
    _write(args, argv, rows, LIVE_ENV if live else None, peaks)
    _print_peaks(peaks)
    print(f"wrote {args.out}")
    return 0


def _case(args: argparse.Namespace, method: str, precision: str) -> Case:
    return Case(
        args.model,
        method,
        precision,
        args.batch,
        args.seq_len,
        args.steps,
        args.optimizer_in_backward,
        args.dropout,
        args.reference_base,
    )


def _print_peaks(peaks: dict[str, tuple[float, str]]) -> None:
    for precision, (flops, source) in peaks.items():
        print(f"MFU {precision}: against {flops / 1e12:.3g} TFLOP/s ({source})")


def _write(
    args: argparse.Namespace,
    argv: list[str] | None,
    rows: list[dict],
    live_env: dict | None,
    peaks: dict[str, tuple[float, str]],
) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": args.model,
                "model_dir": str(args.model_dir),
                "batch": args.batch,
                "seq_len": args.seq_len,
                "timed_steps": args.steps - 1,
                "lora": {"rank": RANK, "alpha": 2 * RANK, "targets": "all-linear", "dropout": args.dropout},
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "cpu": platform.processor() or platform.machine(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cpu_native_bf16": cpu_has_native_bf16(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "threads": args.threads or torch.get_num_threads(),
                "load_avg": os.getloadavg(),
                "command": "python bench/train_step.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "live_memory_env": live_env,
                "optimizer_in_backward": args.optimizer_in_backward,
                "reference_base": args.reference_base,
                "clipping": None if args.optimizer_in_backward else 1.0,
                "mfu_peak_flops_per_s": {
                    p: {"flops_per_s": f, "source": src} for p, (f, src) in peaks.items()
                },
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


def run_interleaved(args: argparse.Namespace, argv: list[str] | None) -> int:
    """--interleaved: per method and precision, one process running the loops' steps alternately."""
    print(
        f"{args.model}, batch {args.batch} x {args.seq_len}, {args.steps - 1} timed steps per loop, one process"
    )
    print(f"{'method':<6} {'prec':<5} {'loop':<16} {'step s':>7} {'MFU':>6} {'speed':>6}  95% interval")
    rows = []
    peaks = {}
    tokens = args.batch * args.seq_len
    loops = (*LOOPS, "adaptlab+compile") if args.compile else LOOPS
    mode = "interleaved+compile" if args.compile else "interleaved"
    for precision in args.precisions.split(","):
        peaks[precision] = peak = peak_flops(precision)
        for method in args.only.split(","):
            per_token = flops_per_token(_case(args, method, precision))
            r = _in_subprocess(mode, method, precision, args)
            row = {"method": method, "precision": precision, "loop": "interleaved", **r}
            rows.append(row)
            if "error" in r:
                print(f"{method:<6} {precision:<5} error: {r['error']}")
                continue
            row["flops_per_token"] = per_token
            for loop in loops:
                key = loop.replace("+", "_")
                row[f"{key}_mfu"] = mfu = tokens * per_token / r[f"{key}_step_s"] / peak[0]
                ratio = r.get("speed_ratio" if loop == "adaptlab" else f"{key}_speed_ratio")
                ci = r.get(f"{key}_speed_ratio_ci95")
                tail = f"{ratio:>6.2f}  [{ci[0]:.2f}, {ci[1]:.2f}]" if ratio else ""
                print(
                    f"{method:<6} {precision:<5} {loop:<16} {r[f'{key}_step_s']:>7.2f} {mfu:>6.1%} {tail}",
                    flush=True,
                )
    _write(args, argv, rows, None, peaks)
    _print_peaks(peaks)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
