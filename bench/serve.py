"""Serving benchmark: a batch mixing 4 LoRA adapters vs the same batch on a merged model vs one adapter at a time.

On smollm2-135m (fp32, CPU unless CUDA is there), with 4 random all-linear r=8 adapters. Every row
generates exactly --new-tokens tokens (eos ignored) so every setup does the same work. Setups:
  mixed      one batch, rows spread over the 4 adapters (peft mixed-adapter forward)
  merged     the same batch on one model with an adapter merged in (no LoRA work at all)
  base       the same batch on the plain base (reference for the LoRA overhead)
  per-adapter  one batch per adapter, run one after another (swapping adapters)
  sequential   one request at a time, each with its adapter
and single-request latency (ms per generated token, prefill) of the merged model vs the base:
merging adds no work, so they should be equal within noise. Prints a table, writes JSON.

    python bench/serve.py                 # a few minutes on 2 idle CPU cores
    python bench/serve.py --threads 1     # on a CPU shared with other busy processes
    python bench/serve.py --batch 8 --new-tokens 32 --repeats 3 --latency-repeats 5 --out bench/results/serve.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adaptlab.models import load_model
from adaptlab.serve import BASE, Engine, Job, Sampling

PROMPTS = [
    "Explain what a file descriptor is.",
    "Write a short poem about the sea.",
    "What does the MIT licence allow?",
    "List three uses of a hash table.",
    "Describe how a bicycle works.",
    "Why is the sky blue?",
    "Give a recipe for pancakes.",
    "Summarise the plot of Hamlet.",
]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: str, root: Path, n: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(n):
        base = load_model(model).model
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(base, LoraConfig(r=8, target_modules=ALL_LINEAR, init_lora_weights=False))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # keep the deltas small so the text stays text-like
                param.data.mul_(0.01)
        path = root / f"domain{i}"
        peft_model.save_pretrained(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = model
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        out[f"domain{i}"] = path
    return out


def merged_engine(model: str, adapter: Path) -> Engine:
    from peft import PeftModel

    loaded = load_model(model)
    loaded.model = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload().eval()
    return Engine(loaded)


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def run_jobs(engine: Engine, rows: list[tuple[list[int], str]], new_tokens: int) -> int:
    jobs = [
        Job(ids, adapter=a, sampling=Sampling(max_new_tokens=new_tokens, ignore_eos=True)) for ids, a in rows
    ]
    engine.generate(jobs)
    return sum(len(j.token_ids) for j in jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), args.adapters)
        mixed = Engine.load(args.model, adapters)
        merged = merged_engine(args.model, adapters["domain0"])
    base = Engine.load(args.model)
    names = list(adapters)
    prompts = [
        mixed.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(args.batch)
    ]
    assignment = [names[i % len(names)] for i in range(args.batch)]
    rows = list(zip(prompts, assignment, strict=True))

    setups: dict[str, Callable[[], int]] = {
        "mixed (1 batch, 4 adapters)": lambda: run_jobs(mixed, rows, args.new_tokens),
        "merged (1 batch, 1 model)": lambda: run_jobs(merged, [(p, BASE) for p in prompts], args.new_tokens),
        "base (1 batch, no adapter)": lambda: run_jobs(base, [(p, BASE) for p in prompts], args.new_tokens),
        "per-adapter (4 batches)": lambda: sum(
            run_jobs(mixed, [r for r in rows if r[1] == n], args.new_tokens) for n in names
        ),
        "sequential (1 request at a time)": lambda: sum(run_jobs(mixed, [r], args.new_tokens) for r in rows),
    }
    print(f"adapters ready; timing {len(setups)} setups x {args.repeats}", flush=True)
    run_jobs(mixed, rows[:2], 2)  # warm-up
    run_jobs(merged, [(prompts[0], BASE)], 2)
    seconds: dict[str, list[float]] = {k: [] for k in setups}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):  # interleaved, so slow drift of a shared machine hits every setup alike
        for name, fn in setups.items():
            s, tokens[name] = timed(fn)
            seconds[name].append(s)
            print(f"  {name}: {tokens[name]} tokens in {s:.2f} s", flush=True)

    # single-request latency: merged vs base, prefill and per generated token
    def latency(engine: Engine) -> tuple[float, float]:
        ids = prompts[0]
        prefill, _ = timed(lambda: run_jobs(engine, [(ids, BASE)], 1))
        total, n = timed(lambda: run_jobs(engine, [(ids, BASE)], args.new_tokens))
        return prefill, (total - prefill) / (n - 1)

    lat: dict[str, list[tuple[float, float]]] = {"merged": [], "base": []}
    for _ in range(args.latency_repeats):
        for name, engine in (("merged", merged), ("base", base)):
            lat[name].append(latency(engine))

    throughput = {}
    for name in setups:
        median_s = statistics.median(seconds[name])
        throughput[name] = {
            "tokens": tokens[name],
            "seconds_median": median_s,
            "seconds_all": seconds[name],
            "tokens_per_s": tokens[name] / median_s,
        }
    latency_ms = {
        name: {
            "prefill_ms_median": 1000 * statistics.median(p for p, _ in values),
            "ms_per_token_median": 1000 * statistics.median(t for _, t in values),
            "ms_per_token_all": [1000 * t for _, t in values],
        }
        for name, values in lat.items()
    }
    result = {
        "model": args.model,
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "machine": platform.processor() or platform.machine(),
        "adapters": args.adapters,
        "lora": "r=8, all linear",
        "batch": args.batch,
        "prompt_tokens": [len(p) for p in prompts],
        "new_tokens_per_row": args.new_tokens,
        "repeats": args.repeats,
        "throughput": throughput,
        "latency_single_request": latency_ms,
        "command": "python bench/serve.py " + " ".join(argv or []),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    ref = throughput["mixed (1 batch, 4 adapters)"]["tokens_per_s"]
    print(f"{args.model}, {result['device']}, batch {args.batch}, {args.new_tokens} new tokens per row")
    print(f"{'setup':36} {'tokens':>7} {'median s':>9} {'tokens/s':>9} {'vs mixed':>9}")
    for name, row in throughput.items():
        print(
            f"{name:36} {row['tokens']:7d} {row['seconds_median']:9.2f} {row['tokens_per_s']:9.1f} "
            f"{row['tokens_per_s'] / ref:8.2f}x"
        )
    print(f"\n{'single request':36} {'prefill ms':>10} {'ms/token':>9}")
    for name, row in latency_ms.items():
        print(f"{name:36} {row['prefill_ms_median']:10.1f} {row['ms_per_token_median']:9.1f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
