"""Will a run fit this machine's memory? The planner's peak estimate of one `adaptlab train` run, checked
against the memory available now, before anything is loaded or written.

The estimate reads the model's config (arch.load_arch: a meta-device build, no weights) and the run's
config, nothing else: the data is not read, so what Python holds of it is left out and GRPO's prompts
count as one token each. It errs low, so a run it refuses cannot fit, and a run it passes may still
be close. `adaptlab train` calls `check_run_fits` for a single-process run; --no-memory-check skips it.

    python -c "from adaptlab.config import RunConfig; from adaptlab.plan.fit import run_peak_bytes; \
print(run_peak_bytes(RunConfig.model_validate({'train': {'batch': 64}}), 'cpu', 'fp32') / 2**30)"
"""

from __future__ import annotations

from typing import Any

from adaptlab.config import RunConfig
from adaptlab.errors import UserError
from adaptlab.plan import grpo as grpo_plan
from adaptlab.plan.arch import Arch, load_arch, targets_for
from adaptlab.plan.estimate import Arm, Shape, memory_breakdown

GRPO_PROMPT_TOKENS = 1  # a lower bound on a task prompt's length: its data is not read here

SIZE_FLAGS: dict[str, tuple[str, str]] = {
    "--batch": ("train", "batch"),
    "--seq-len": ("train", "seq_len"),
    "--grad-accum": ("train", "grad_accum"),
    "--group-size": ("objective", "group_size"),
    "--max-new-tokens": ("objective", "max_new_tokens"),
    "--prompts-per-step": ("objective", "prompts_per_step"),
    "--rank": ("method", "rank"),
}
"""Flags that size a run's memory -> (config section, field)."""

FLAGS_BY_TASK = {
    "sft": ("--batch", "--seq-len", "--rank"),
    "dpo": ("--batch", "--seq-len", "--rank"),
    "grpo": ("--batch", "--group-size", "--max-new-tokens", "--prompts-per-step", "--grad-accum", "--rank"),
}
"""The flags that size each task's peak, the usual culprits first."""


def run_peak_bytes(config: RunConfig, device_type: str, precision: str, arch: Arch | None = None) -> int:
    """The planner's peak memory (bytes) of one process training `config` on this device type."""
    arch = arch or load_arch(config.model.name)
    m, t, o = config.method, config.train, config.objective
    lora = m.method != "full"
    targets = tuple(targets_for(arch, m.targets)) if lora else ()
    arm = Arm(m.method, m.rank if lora else 0, targets, m.dropout if lora else 0.0)
    shape = Shape(
        t.batch,
        t.seq_len,
        t.grad_accum,
        precision,
        t.grad_checkpointing,
        device_type,
        rows_per_example=2 if o.task == "dpo" else 1,
        optimizer_in_backward=t.optimizer_in_backward,
    )
    if o.task != "grpo":
        return memory_breakdown(arch, arm, shape, runtime_bytes=0)["peak"]
    sampling = grpo_plan.Sampling(o.group_size, o.max_new_tokens)
    prompts = o.prompts_per_step or t.batch * t.grad_accum
    shape = grpo_plan.train_shape(shape, GRPO_PROMPT_TOKENS, sampling)
    mem = memory_breakdown(arch, arm, shape, runtime_bytes=0, reference_model=o.kl_beta > 0)
    return grpo_plan.with_sampling(mem, arch, prompts, GRPO_PROMPT_TOKENS, sampling, precision)


def available_bytes(device: Any) -> int:
    """Memory free for a run now: the GPU's free memory on CUDA, the system's available memory on a CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f}" if n < 10 * 2**30 else f"{n / 2**30:,.0f}"


def _culprit(config: RunConfig, device_type: str, precision: str, arch: Arch) -> str | None:
    """The flag whose default value brings the peak down the most (None when none is above its default)."""
    best, best_peak = None, None
    for flag in FLAGS_BY_TASK[config.objective.task]:
        if flag == "--rank" and config.method.method == "full":
            continue
        section, field = SIZE_FLAGS[flag]
        spec = getattr(config, section)
        default = type(spec).model_fields[field].default  # None: --prompts-per-step's batch x grad-accum
        value = getattr(spec, field)
        if value is None or (default is not None and value <= default):
            continue
        lowered = config.model_copy(update={section: spec.model_copy(update={field: default})})
        peak = run_peak_bytes(lowered, device_type, precision, arch)
        if best_peak is None or peak < best_peak:
            best, best_peak = flag, peak
    return best


def check_run_fits(config: RunConfig, device: Any, precision: str) -> None:
    """UserError in one line, naming the flag to lower, when the run's planned peak exceeds the memory
    available on `device`; silent when it fits or when the model's architecture cannot be read here."""
    try:
        arch = load_arch(config.model.name)
        peak = run_peak_bytes(config, device.type, precision, arch)
    except (UserError, KeyError, ValueError, AttributeError):
        return  # the run itself reports what is wrong with the model or its targets
    available = available_bytes(device)
    if peak <= available:
        return
    flag = _culprit(config, device.type, precision, arch)
    flags = [f for f in FLAGS_BY_TASK[config.objective.task] if f != "--rank" and f != flag][:2]
    if flag is None:
        flag, flags = flags[0], flags[1:]
        given = f"this run ({config.method.method} on {config.model.name})"
    else:
        section, field = SIZE_FLAGS[flag]
        given = f"{flag} {getattr(getattr(config, section), field)}"
    where = "free on the GPU" if device.type == "cuda" else "available"
    raise UserError(
        f"{given} needs about {_gib(peak)} GiB, {_gib(available)} GiB {where}: lower {flag} "
        f"(or {' / '.join(flags)}), or pass --no-memory-check"
    )
