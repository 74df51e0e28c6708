"""What a finished run leaves: its artifact (RUN/adapter or RUN/model) and summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptlab import distributed as dist
from adaptlab.hardware import peak_mem_bytes, step_time_spread
from adaptlab.run_setup import Setup
from adaptlab.rundir import RunDir, dir_bytes, versions, write_dir
from adaptlab.train.step import Progress


def save_artifact(setup: Setup) -> Path:
    """Write RUN/adapter (PEFT format) for the LoRA family or RUN/model (HF format) for full.

    Under FSDP2 the shards are gathered first (every rank takes part); rank 0 writes the same
    directory one process would.
    """
    run = setup.run
    is_lora = setup.config.method.is_lora
    target = run.adapter if is_lora else run.model
    state = dist.full_state(setup.model, trainable_only=is_lora) if setup.parallel == "fsdp" else None
    if setup.world.is_main:
        model = dist.unwrap(setup.model)

        def write(tmp: Path) -> None:
            if is_lora:
                model.save_pretrained(str(tmp), save_embedding_layers=False, state_dict=state)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
                setup.tokenizer.save_pretrained(str(tmp))

        write_dir(target, write)
    dist.barrier()
    return target


def build_summary(
    setup: Setup, progress: Progress, artifact: Path, final_loss: float | None, val: dict[str, float]
) -> dict[str, Any]:
    """summary.json: what trained, what it cost, where the artifact is, and the software that ran it."""
    cfg = setup.config
    summary = {
        "method": cfg.method.method,
        "base_model": cfg.model.name,
        "trainable_params": setup.report.trainable,
        "total_params": setup.report.total,
        "peak_mem_bytes": peak_mem_bytes(setup.device),
        "wall_s": progress.wall_s(),
        "train_s": progress.train_time,
        "tokens_per_s": progress.tokens_seen / progress.train_time if progress.train_time > 0 else 0.0,
        "tokens_seen": progress.tokens_seen,
        "steps": setup.total_steps,
        "final_train_loss": final_loss,
        "final_val_loss": val.get("val_loss"),
        "artifact": artifact.name,
        "artifact_bytes": dir_bytes(artifact),
        "precision": setup.precision,
        "device": str(setup.device),
        "lr": cfg.resolved_lr(),
        "train_examples": len(setup.train_examples),
        "versions": versions(),
        "world_size": setup.world.world_size,
        "parallel": setup.parallel,
        "compiled": setup.compiled,
        "step_time": step_time_spread(
            [r["tokens_per_s"] for r in setup.run.read_metrics() if "tokens_per_s" in r]
        ),
    }
    if cfg.objective.task != "sft":
        summary["task"] = cfg.objective.task
        summary["final_val"] = val
    if cfg.model.init_from:
        from adaptlab.init_from import chain

        summary["init_from"] = chain(cfg)
    if cfg.train.lr_changes:
        summary["lr_changes"] = [c.model_dump() for c in cfg.train.lr_changes]
    if cfg.method.method == "qlora":
        from adaptlab.quantize import quantization_info

        summary["quantization"] = quantization_info(setup.model)
    return summary


def _last_train_loss(run: RunDir) -> float | None:
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    return losses[-1] if losses else None
