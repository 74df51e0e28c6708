"""Benchmark `adaptlab analyze` on smollm2-135m: seconds per layer shape for a LoRA and a full update.

Builds two artifacts in a temporary folder: a LoRA r=16 all-linear adapter with random nonzero B
(peft init_lora_weights=False) and a "full" model whose every Linear weight got a small dense random
perturbation; analyses both (all 210 Linear layers), prints a table and writes bench/results/analyze.json.
With --check it also counts intruders with a plain full-SVD reference and reports disagreements.

    python bench/analyze.py [--check] [--threads N] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adaptlab.analysis import analyze, layer_updates
from adaptlab.models import load_model

BASE = "smollm2-135m"
RESULTS = Path(__file__).resolve().parent / "results" / "analyze.json"


def make_lora(out: Path, rank: int = 16) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(BASE).model
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def make_full(out: Path, rel_noise: float = 0.02) -> Path:
    torch.manual_seed(0)
    loaded = load_model(BASE)
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear) and module is not loaded.model.get_output_embeddings():
                w = module.weight
                w.add_(torch.randn_like(w) * (rel_noise * w.norm() / w.numel() ** 0.5))
    loaded.model.save_pretrained(out, safe_serialization=True)
    return out


def reference_mismatches(tuned: Path, result: dict[str, Any]) -> int:
    """Layers whose intruder count differs from a plain torch.linalg.svd on both matrices."""
    updates = layer_updates(BASE, tuned)
    counts = {r["name"]: r["intruders"] for r in result["layers"]}
    bad = 0
    for layer in updates.layers:
        u0 = torch.linalg.svd(layer.w0, full_matrices=False).U
        u1 = torch.linalg.svd(layer.w0 + layer.dw, full_matrices=False).U
        max_cos = (u1.T @ u0).abs().amax(dim=1)[: result["k"]]
        bad += int((max_cos < result["eps"]).sum()) != counts[layer.name]
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare counts with a full-SVD reference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--work", type=Path, default=None, help="keep (and reuse) the built artifacts here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "base": BASE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        lora, full = work / "lora", work / "full"
        artifacts = {
            "lora_r16": lora if (lora / "adapter_config.json").exists() else make_lora(lora),
            "full": full if (full / "config.json").exists() else make_full(full),
        }
        for arm, path in artifacts.items():
            start = time.perf_counter()
            result = analyze(BASE, path)
            wall = time.perf_counter() - start
            run = {
                "layers": result["totals"]["layers"],
                "intruders": result["totals"]["intruders"],
                "load_s": result["timing"]["load_s"],
                "shapes": result["timing"]["shapes"],
                "wall_s": wall,
            }
            if args.check:
                run["reference_mismatched_layers"] = reference_mismatches(path, result)
            report["runs"][arm] = run

    print(f"adaptlab analyze on {BASE}, {report['threads']} torch threads, {report['cpus']} CPUs")
    print(f"{'arm':<10} {'shape':>10} {'layers':>7} {'s':>7} {'ms/layer':>9}")
    for arm, run in report["runs"].items():
        for shape, t in run["shapes"].items():
            per_layer_ms = 1000 * t["seconds"] / t["layers"]
            print(f"{arm:<10} {shape:>10} {t['layers']:>7} {t['seconds']:>7.2f} {per_layer_ms:>9.0f}")
        extra = f", reference mismatches {run['reference_mismatched_layers']}" if args.check else ""
        print(
            f"{arm:<10} {'total':>10} {run['layers']:>7} {run['wall_s']:>7.2f}   "
            f"(load {run['load_s']:.2f} s, intruders {run['intruders']}{extra})"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
