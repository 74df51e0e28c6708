"""`plan(...)`: memory, time, capacity and a recommendation for full, LoRA, DoRA and QLoRA, before training.

It reads the model's architecture (config + a meta-device build, no weights), counts the data in
the model's tokens, and estimates for each method the trainable parameters, peak training memory
(broken down), time per epoch and artifact size, then recommends one with reasons and the
`adaptlab compare` command that confirms it (for DPO, which compare's studies do not train, one
`adaptlab train --task dpo` command per method and an `adaptlab eval --drift` of each run). Library only: the CLI (`adaptlab plan`) prints it.

    python -c "from adaptlab.plan import plan; import json; \
print(json.dumps(plan('tiny-random', ['python-stdlib'], benchmark=False)['recommendation'], indent=1))"
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from adaptlab.config import check_rank, check_seq_len, default_lr
from adaptlab.errors import UserError
from adaptlab.plan import advice
from adaptlab.plan import grpo as grpo_plan
from adaptlab.plan.arch import Arch, load_arch, targets_for
from adaptlab.plan.datasize import DataSize, measure_data
from adaptlab.plan.estimate import (
    PY_BYTES_PER_TOKEN,
    Arm,
    Shape,
    artifact_bytes,
    dpo_reference,
    memory_breakdown,
    run_config,
    step_time_at,
    trainable_params,
    transforms_report,
)
from adaptlab.plan.measure import (
    CUDA_CONTEXT_BYTES,
    attention_throughput,
    device_throughput,
    dropout_throughput,
    runtime_baseline_bytes,
)
from adaptlab.transforms import Transforms, transforms_for

TASKS = ("cpt", "ift", "dpo", "grpo")
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SI = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
# Used when no micro-benchmark is wanted (tests, --no-benchmark): a modest CPU core pair.
NOMINAL_THROUGHPUT = {"matmul_flops_per_s": 50e9, "mem_bytes_per_s": 5e9}


def parse_memory(text: str) -> int:
    """Bytes from '24GiB', '24G' (binary), '16GB' (decimal), '512MiB', '1.5TiB' or a plain number."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m:
        value, unit = float(m.group(1)), m.group(2).lower()
        if unit in _SI:
            return int(value * _SI[unit])
        unit = unit.removesuffix("ib").removesuffix("b") if unit not in ("b", "") else unit
        if unit in _UNITS:
            return int(value * _UNITS[unit])
    raise UserError(f"--memory {text!r}: expected a size like 24GiB, 16GB, 512MiB or a number of bytes")


def _tokenizer_bytes(spec: str) -> int:
    from adaptlab.models import local_dir

    path = local_dir(spec)
    if path is None:
        return 0
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.name in names or p.name.endswith(".model"))


def _compare_command(model: str, data: list[str], tokens: int, task: str = "cpt") -> str:
    name = Path(model).name or "model"
    data_args = " ".join(f"--data {d}" for d in data)
    if task == "grpo":  # GRPO arms at matched episodes: the rl study
        return f"adaptlab compare --model {model} {data_args} --study rl --out runs/rl-{name}"
    if task == "dpo":  # compare's studies train on text, not preference pairs: one DPO run per method
        runs = {method: f"runs/dpo-{method}-{name}" for method in ("lora", "full")}
        train = [
            f"adaptlab train --task dpo --model {model} {data_args} --method {method} --tokens {tokens} --out {run}"
            for method, run in runs.items()
        ]
        return "\n".join(train + [f"adaptlab eval --tuned {run} --drift" for run in runs.values()])
    return f"adaptlab compare --model {model} {data_args} --study methods --tokens {tokens} --out runs/compare-{name}"


def _check_args(
    task: str | None,
    seq_len: int,
    batch: int,
    grad_accum: int,
    ranks: Sequence[int],
    epochs: float,
    kl_beta: float = 0.0,
    dropout: float = 0.0,
    grpo_flags: bool = False,
) -> None:
    if task is not None and task not in TASKS:
        raise UserError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if kl_beta < 0 or (kl_beta > 0 and task != "grpo"):
        raise UserError(f"--kl-beta {kl_beta:g}: GRPO's KL penalty, a number >= 0 with --task grpo")
    if grpo_flags and task != "grpo":
        raise UserError("--group-size and --max-new-tokens plan GRPO's sampling: add --task grpo")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1) (got {dropout:g})")
    for flag, value in (("--seq-len", seq_len), ("--batch", batch), ("--grad-accum", grad_accum)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer (got {value})")
    if seq_len < 8:
        raise UserError(f"--seq-len must be at least 8 (got {seq_len})")
    if not ranks or any(r < 1 for r in ranks):
        raise UserError(f"--ranks must be positive integers (got {', '.join(map(str, ranks)) or 'none'})")
    if epochs <= 0:
        raise UserError(f"--epochs must be positive (got {epochs})")


def _check_against_arch(
    arch: Arch, target_names: tuple[str, ...], seq_len: int, ranks: Sequence[int]
) -> None:
    """The bounds training enforces (methods.check_against_model), from the architecture alone."""
    check_seq_len(seq_len, arch.max_positions, arch.spec)
    targeted = {n: s for n, s in arch.linear_shapes.items() if n.rsplit(".", 1)[-1] in target_names}
    check_rank(max(ranks), targeted, flag="--ranks")


def _arms(ranks: Sequence[int], target_names: tuple[str, ...], dropout: float = 0.0) -> dict[str, Arm]:
    """full, one LoRA per rank (the default rank keyed "lora"), DoRA and QLoRA at the default rank."""
    arms: dict[str, Arm] = {"full": Arm("full")}
    default_rank = 16 if 16 in ranks else ranks[0]
    for r in ranks:
        arms["lora" if r == default_rank else f"lora_r{r}"] = Arm("lora", r, target_names, dropout)
    arms["dora"] = Arm("dora", default_rank, target_names, dropout)
    arms["qlora"] = Arm("qlora", default_rank, target_names, dropout)
    return arms


def _measure(
    model: str,
    sources: list[str],
    task: str | None,
    seq_len: int,
    text_field: str,
    sampling: grpo_plan.Sampling,
) -> tuple[str, DataSize, int]:
    """The task (inferred from the data when not given), the data's size in the model's tokens and,
    for GRPO, the task's longest prompt in tokens (0 otherwise)."""
    from adaptlab.models import load_tokenizer

    prompt_len = 0
    if task == "grpo":  # a task of prompts (arithmetic or prompt/answer JSONL), sampled then trained on
        if len(sources) != 1:
            raise UserError("--task grpo takes one --data: arithmetic or a JSONL of prompt/answer rows")
        size, prompt_len = grpo_plan.task_data_size(sources[0], load_tokenizer(model), sampling)
    else:
        size = measure_data(
            sources, load_tokenizer(model), seq_len, task=task or "cpt", text_field=text_field
        )
    task = task or ("ift" if size.kind == "chat" else "cpt")
    if task == "ift" and size.kind == "text":
        raise UserError(
            "--task ift needs instruction records (prompt/response or messages); this data is plain text"
        )
    return task, size, prompt_len


def _rates(
    arch: Arch, shape: Shape, dev: Any, prec: str, dropout: float, benchmark: bool, refresh: bool
) -> dict[str, Any]:
    """The device's measured rates at the micro-batch training runs (a matmul's rate depends on its
    rows), or a nominal throughput that says so when no micro-benchmark is wanted."""
    if not benchmark:
        return {**NOMINAL_THROUGHPUT, "device": "nominal (no micro-benchmark)", "precision": prec}
    return {
        **device_throughput(
            str(dev), prec, shape.batch * shape.seq_len, arch.hidden, arch.intermediate, refresh=refresh
        ),
        **attention_throughput(
            str(dev), prec, shape.batch, shape.seq_len, arch.n_heads, arch.head_dim, refresh=refresh
        ),
        **(dropout_throughput(str(dev), refresh=refresh) if dropout > 0 else {}),
    }


def _cost(
    model: str, size: DataSize, budget: int, device_type: str, rate: dict[str, Any], refresh: bool
) -> dict[str, Any]:
    """What every method's estimate shares: runtime, data and tokenizer bytes and the measured rates."""
    held_tokens = min(budget, size.tokens_per_epoch)  # training keeps the examples it will use
    return {
        "runtime": runtime_baseline_bytes(refresh) if device_type == "cpu" else CUDA_CONTEXT_BYTES,
        "data_bytes": size.characters + PY_BYTES_PER_TOKEN * held_tokens,
        "tokenizer_bytes": _tokenizer_bytes(model),
        "rate": rate,
    }


def _steps_per_epoch(size: DataSize, shape: Shape, task: str) -> int:
    """Optimizer steps per pass over the data: its tokens over a step's, or for GRPO its prompts over a step's."""
    per_step = shape.batch * shape.grad_accum
    if task == "grpo":
        return max(1, -(-size.train_documents // per_step))
    return max(1, -(-size.tokens_per_epoch // (per_step * shape.seq_len * shape.rows_per_example)))


def _advice(
    arch: Arch,
    target_names: tuple[str, ...],
    methods: dict[str, dict[str, Any]],
    shape: Shape,
    unique_tokens: int,
) -> dict[str, Any]:
    """The plan's "capacity" (a suggested rank and its warnings) and "suggested" (lr and batch) parts."""
    suggested = advice.suggest_rank(lambda r: arch.lora_params(r, list(target_names)), unique_tokens)
    return {
        "capacity": {
            "heuristic": advice.HEURISTIC,
            "suggested_rank": suggested,
            "warnings": _capacity_warnings(methods, unique_tokens, suggested),
        },
        "suggested": {
            "lr": advice.suggested_lrs(),
            "batch": advice.suggested_batch(shape.batch, shape.grad_accum, shape.seq_len),
        },
    }


def _method_entry(
    arch: Arch,
    arm: Arm,
    shape: Shape,
    task: str,
    cost: dict[str, Any],
    mem_limit: int | None,
    size: DataSize,
    steps_per_epoch: int,
    transforms: Transforms,
    kl_beta: float = 0.0,
) -> dict[str, Any]:
    """One method's estimates; cost holds runtime, data and tokenizer bytes and the measured rates.
    `transforms`: what `adaptlab train` applies to this method's run, which the estimates model."""
    n_train = trainable_params(arch, arm)
    kl = task == "grpo" and kl_beta > 0.0
    mem = memory_breakdown(
        arch, arm, shape, cost["runtime"], cost["data_bytes"], reference_model=kl, transforms=transforms
    )
    timing = step_time_at(arch, arm, shape, cost["rate"], transforms)
    reference = (
        dpo_reference(arm, timing) if task == "dpo" else grpo_plan.reference(arm, timing) if kl else None
    )
    if reference is not None:
        timing["reference_s"] = reference["reference_s"]
        timing["step_s"] += reference["reference_s"]
    entry: dict[str, Any] = {
        "method": arm.method,
        "rank": arm.rank or None,
        "targets": list(arm.targets) or None,
        "trainable_params": n_train,
        "trainable_fraction": n_train / arch.total_params,
        "peak_mem_bytes": mem["peak"],
        "fits": None if mem_limit is None else mem["peak"] <= mem_limit,
        "memory": mem,
        "step_s": timing["step_s"],
        "time_per_epoch_s": timing["step_s"] * steps_per_epoch,
        "time_breakdown_s": {k: v for k, v in timing.items() if k != "step_s"},
        "artifact_bytes": artifact_bytes(arch, arm, cost["tokenizer_bytes"]),
        "lr": default_lr(arm.method),
        "compile": {"on": transforms.compile, "why": transforms.why["compile"]},
        "transforms": transforms_report(arch, arm, shape, transforms),
    }
    if reference is not None:
        entry["reference"] = reference["reference"]
    if arm.is_lora:
        entry["capacity"] = advice.capacity(n_train, size.tokens_per_epoch)
    return entry


def _device_limit(methods: dict[str, dict[str, Any]], dev: Any, mem_limit: int | None) -> int:
    """The memory limit used; without one, "fits" means fits in this device's memory."""
    if mem_limit is not None:
        return mem_limit
    import torch

    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else _cpu_memory_bytes()
    for entry in methods.values():
        entry["fits"] = entry["peak_mem_bytes"] <= total
    return total


def _capacity_warnings(
    methods: dict[str, dict[str, Any]], unique_tokens: int, suggested: int | None
) -> list[str]:
    warnings = []
    for key, entry in methods.items():
        if key.startswith("lora") and entry["capacity"]["exceeded"]:
            warnings.append(
                f"{key} (r={entry['rank']}): {unique_tokens:,} unique training tokens exceed its "
                f"~{entry['capacity']['capacity_tokens']:,}-token capacity; "
                + (
                    f"suggested rank: {suggested}"
                    if suggested
                    else "no rank up to 512 suffices: consider full"
                )
                + " (heuristic)"
            )
    return warnings


def _setup(shape: Shape, device: str, epochs: float) -> dict[str, Any]:
    """The run's settings as the plan reports them (the rest of "setup" is added by `plan`)."""
    return {
        "device": device,
        "precision": shape.precision,
        "batch": shape.batch,
        "grad_accum": shape.grad_accum,
        "seq_len": shape.seq_len,
        "grad_checkpointing": shape.grad_checkpointing,
        "optimizer_in_backward": shape.optimizer_in_backward,
        "epochs": epochs,
    }


def _architecture(arch: Arch) -> dict[str, Any]:
    return {
        "model_type": arch.model_type,
        "layers": arch.n_layers,
        "hidden": arch.hidden,
        "intermediate": arch.intermediate,
        "heads": arch.n_heads,
        "kv_heads": arch.n_kv_heads,
        "vocab": arch.vocab,
        "total_params": arch.total_params,
        "tied_embeddings": arch.tied,
    }


def _notes(task: str, kl_beta: float = 0.0, sampling: grpo_plan.Sampling | None = None) -> list[str]:
    notes = [
        "time per epoch is an estimate: training FLOPs and memory traffic over a micro-benchmark of this device",
        "QLoRA is estimated from its definition (NF4 weights, 0.5 byte + ~0.127 bit of constants per Linear "
        "weight; embeddings and norms stay fp32); on CPU the fp32 base is loaded before quantizing",
        "DoRA/QLoRA estimates are not yet checked against runs; full and LoRA are (bench/plan_accuracy.py)",
    ]
    if task == "grpo":
        sampling = sampling or grpo_plan.Sampling()
        notes.append(
            f"grpo: each step samples {sampling.group_size} completions of up to {sampling.max_new_tokens} "
            "tokens per prompt, all its prompts' in one batch with a KV cache (memory: memory.generation; "
            "time: time_breakdown_s.generation_s), then trains on them"
        )
        notes.append(
            f"grpo: kl_beta {kl_beta:g}: the reference scores each step's completions (a forward pass; full "
            "fine-tuning keeps a frozen copy of the base for it, in memory.weights)"
            if kl_beta > 0.0
            else "grpo: no KL penalty (kl_beta 0, the default): no reference pass; --kl-beta plans one"
        )
    if task == "dpo":
        notes.append(
            "dpo: two sequences per pair; the reference adds a forward pass per step (LoRA family: adapter "
            "disabled) or one up-front pass over the pairs (full: precomputed log-probs), and no memory at the peak"
        )
    return notes


def plan(
    model: str,
    data: list[str] | str,
    task: str | None = None,
    seq_len: int = 256,
    batch: int = 4,
    grad_accum: int = 1,
    ranks: list[int] | tuple[int, ...] = (16,),
    targets: str | list[str] = "all-linear",
    memory: int | str | None = None,
    device: str | None = None,
    precision: str = "auto",
    epochs: float = 1.0,
    tokens: int | None = None,
    grad_checkpointing: bool = False,
    optimizer_in_backward: bool = False,
    text_field: str = "text",
    benchmark: bool = True,
    refresh: bool = False,
    compare_root: str | None = None,
    kl_beta: float = 0.0,
    dropout: float = 0.0,
    group_size: int | None = None,
    max_new_tokens: int | None = None,
    compile: bool | str = "auto",
) -> dict[str, Any]:
    """Estimates for full, LoRA (each rank), DoRA and QLoRA, and a recommendation (see the module docstring).

    tokens: a token budget instead of `epochs` passes over the data. benchmark=False skips the device
    micro-benchmark (times then use a nominal throughput and say so). refresh re-measures cached values.
    compare_root: a folder of comparisons (OUT dirs); those of the same base are quoted as measurements.
    kl_beta: GRPO's KL penalty (`train --kl-beta`); above 0 each step adds the reference's forward pass
    and full fine-tuning a frozen copy of the base. dropout: the LoRA family's (`train --dropout`).
    group_size, max_new_tokens: GRPO's sampling (`train --group-size`, `--max-new-tokens`; default 8, 32).
    compile: `train --compile` (true, false or auto); each method's entry says what training decides
    (adaptlab.transforms) and models those paths.
    """
    from adaptlab.hardware import choose_precision, pick_device

    sources = [data] if isinstance(data, str) else list(data)
    grpo_flags = group_size is not None or max_new_tokens is not None
    _check_args(task, seq_len, batch, grad_accum, ranks, epochs, kl_beta, dropout, grpo_flags)
    sampling = grpo_plan.sampling_from(group_size, max_new_tokens)
    mem_limit = parse_memory(memory) if isinstance(memory, str) else memory
    dev = pick_device(device)
    prec = choose_precision(precision, dev)

    arch = load_arch(model)
    target_names = tuple(targets_for(arch, targets))
    _check_against_arch(arch, target_names, seq_len, ranks)
    task, size, prompt_len = _measure(model, sources, task, seq_len, text_field, sampling)
    budget = tokens if tokens is not None else round(size.tokens_per_epoch * epochs)
    rows = 2 if task == "dpo" else 1
    shape = Shape(batch, seq_len, grad_accum, prec, grad_checkpointing, dev.type, rows, optimizer_in_backward)
    run_shape = shape  # the run's own settings (its config), before GRPO's rows
    if task == "grpo":  # trains on rows of prompt + completion, shorter than seq_len
        shape = grpo_plan.train_shape(shape, prompt_len, sampling)

    rate = _rates(arch, shape, dev, prec, dropout, benchmark, refresh)
    cost = _cost(model, size, budget, dev.type, rate, refresh)
    steps_per_epoch = _steps_per_epoch(size, run_shape, task)
    methods = {}
    for key, arm in _arms(ranks, target_names, dropout).items():
        config = run_config(model, arm, run_shape, task, compile, budget)
        transforms = transforms_for(config, dev, prec, None, arch.total_params)
        methods[key] = _method_entry(
            arch, arm, shape, task, cost, mem_limit, size, steps_per_epoch, transforms, kl_beta
        )
        if task == "grpo":
            grpo_plan.add_sampling(methods[key], arch, batch * grad_accum, prompt_len, sampling, prec, rate)
    limit_used = _device_limit(methods, dev, mem_limit)
    command = _compare_command(model, sources, min(budget, max(size.tokens_per_epoch, 1)), task)
    setup = _setup(run_shape, str(dev), epochs if tokens is None else tokens / max(size.tokens_per_epoch, 1))
    setup.update(
        token_budget=budget,
        steps_per_epoch=steps_per_epoch,
        memory_limit_bytes=limit_used,
        targets=list(target_names),
        dropout=dropout,
        kl_beta=kl_beta,
    )
    if task == "grpo":  # the task's longest prompt
        setup["sampling"] = {**asdict(sampling), "prompt_len": prompt_len}
    return {
        "model": model,
        "data": {**size.as_dict(), "sources": sources},
        "task": task,
        "architecture": _architecture(arch),
        "setup": setup,
        "throughput": rate,
        "methods": methods,
        **_advice(arch, target_names, methods, run_shape, size.tokens_per_epoch),
        "recommendation": advice.recommend(
            methods,
            "lora",
            task,
            size.tokens_per_epoch,
            limit_used,
            command,
            advice.measured_comparisons(model, compare_root),
        ),
        "notes": _notes(task, kl_beta, sampling),
    }


def _cpu_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)
