"""Evaluation throughput: adaptlab's NLL scoring vs a plain forward pass over the same tokens, same run.

Timings per corpus, each the best of --repeats:
  eval     score_documents(): tokenize, window, pack several windows a row (attention kept inside each,
           positions restarting), forward to the final hidden states, chunked fp32 NLL, per-document sums;
  padded   score_documents(pack=False): one window a row, right-padded (the previous layout);
  forward  model(input_ids, attention_mask) alone on the padded batches of one window a row (no loss:
           the plain forward a user would write);
  packed   model(input_ids) on the same tokens packed densely into rows of --seq-len with attention
           across documents (no pad, no mask: an upper bound, not a correct evaluation).
ratio = eval tokens/s / forward tokens/s (goal >= 0.95); ratio_padded likewise for padded;
ratio_packed = eval against packed.
Tokens are the real (non-pad) input tokens. Prints a table, writes bench/results/eval.json.

    python bench/eval.py --model smollm2-135m --tokens 4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from adaptlab.evaluate.perplexity import (
    batches,
    collate_windows,
    encode_documents,
    make_windows,
    score_documents,
)
from adaptlab.models import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpus(name: str, tokenizer: Any, budget: int, seq_len: int) -> list[str]:
    """The first documents of a shared corpus, each cut to 4 windows, until `budget` tokens."""
    path = SHARED / ("systems/man_pages.jsonl" if name == "man_pages" else "general/wordnet_glosses.jsonl")
    texts, total = [], 0
    with path.open() as fh:
        for line in itertools.islice(fh, 20000):
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"][: 4 * seq_len]
            texts.append(tokenizer.decode(ids))
            total += len(ids)
            if total >= budget:
                break
    return texts


def best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(
    model: Any, tokenizer: Any, texts: list[str], seq_len: int, batch: int, repeats: int
) -> dict[str, Any]:
    seqs, masks, _ = encode_documents(texts, tokenizer, seq_len)
    windows = make_windows(seqs, masks, seq_len)
    device = next(model.parameters()).device
    prepared = [collate_windows(b, tokenizer.pad_token_id, device) for b in batches(windows, batch, seq_len)]
    tokens = int(sum(int(t["attention_mask"].sum()) for t in prepared))
    padded = int(sum(t["attention_mask"].numel() for t in prepared))
    flat = [i for w in windows for i in w.ids[:-1]]
    rows = [flat[i : i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    packed = [torch.tensor(rows[i : i + batch], device=device) for i in range(0, len(rows), batch)]
    packed_tokens = sum(p.numel() for p in packed)

    def run_eval() -> None:
        score_documents(model, tokenizer, texts, seq_len=seq_len, batch_size=batch)

    def run_padded() -> None:
        score_documents(model, tokenizer, texts, seq_len=seq_len, batch_size=batch, pack=False)

    def run_forward() -> None:
        with torch.inference_mode():
            for t in prepared:
                model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False)

    def run_packed() -> None:
        with torch.inference_mode():
            for p in packed:
                model(input_ids=p, use_cache=False)

    with torch.inference_mode():  # warm-up: one batch of each kind
        model(input_ids=prepared[0]["input_ids"][:1], attention_mask=prepared[0]["attention_mask"][:1])
    t_forward = best(run_forward, repeats)
    t_eval = best(run_eval, repeats)
    t_padded = best(run_padded, repeats)
    t_packed = best(run_packed, repeats) if packed else float("nan")
    return {
        "docs": len(texts),
        "windows": len(windows),
        "tokens": tokens,
        "pad_fraction": 1 - tokens / padded,
        "eval_tok_s": tokens / t_eval,
        "padded_tok_s": tokens / t_padded,
        "forward_tok_s": tokens / t_forward,
        "packed_tok_s": packed_tokens / t_packed if packed else float("nan"),
        "ratio": t_forward / t_eval,
        "ratio_padded": t_forward / t_padded,
        "ratio_packed": (tokens / t_eval) / (packed_tokens / t_packed) if packed else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4096, help="token budget per corpus")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    rows = {}
    for name in ("man_pages", "wordnet_glosses"):
        texts = corpus(name, loaded.tokenizer, args.tokens, args.seq_len)
        rows[name] = bench(loaded.model, loaded.tokenizer, texts, args.seq_len, args.batch, args.repeats)
    header = (
        f"{'corpus':<16}{'docs':>6}{'tokens':>8}{'pad%':>6}{'eval tok/s':>12}{'padded tok/s':>14}"
        f"{'fwd tok/s':>11}{'packed tok/s':>14}{'ratio':>7}{'padded':>8}{'vs packed':>10}"
    )
    print(header)
    for name, r in rows.items():
        print(
            f"{name:<16}{r['docs']:>6}{r['tokens']:>8}{100 * r['pad_fraction']:>6.1f}{r['eval_tok_s']:>12.0f}"
            f"{r['padded_tok_s']:>14.0f}{r['forward_tok_s']:>11.0f}{r['packed_tok_s']:>14.0f}{r['ratio']:>7.2f}"
            f"{r['ratio_padded']:>8.2f}{r['ratio_packed']:>10.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": f"python bench/eval.py --model {args.model} --tokens {args.tokens} --seq-len {args.seq_len} "
                f"--batch {args.batch} --repeats {args.repeats}"
                + (f" --threads {args.threads}" if args.threads else ""),
                "model": args.model,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_avg": os.getloadavg(),
                "machine": platform.processor() or platform.machine(),
                "results": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
