"""The one training loop, for every method: AdamW, warmup + cosine, accumulation, clipping, checkpoints.

Methods differ only in which parameters train (methods.py) and what is saved at the end (an adapter
or a model); everything else here is shared, so a comparison compares methods, not loops.

The unit of a step is the global batch (batch x grad_accum x world size). Example order is a pure
function of (seed, step): epoch e uses randperm(n, seed + e), so a resumed run sees exactly the data
an uninterrupted one would, and ranks would take disjoint slices of the same global batch. The loss of
a step is the sum of token losses over the global batch divided by its number of label tokens, so
batch 4 x accum 1 and batch 1 x accum 4 take the same step.

    adaptlab train --model tiny-random --method lora --data python-stdlib --steps 20 --out runs/demo
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adaptlab import outputs
from adaptlab.config import RunConfig, build_config, load_config
from adaptlab.data.corpus import IGNORE_INDEX, Example, build_examples, collate, split_documents
from adaptlab.data.sources import load_documents
from adaptlab.errors import UserError
from adaptlab.hardware import autocast, choose_precision, mem_bytes, peak_mem_bytes, pick_device, reset_peak
from adaptlab.methods import ParamReport, apply_method, param_report, trainable_parameters
from adaptlab.models import load_model
from adaptlab.rundir import RunDir, dir_bytes, load_checkpoint, save_checkpoint, versions

LogFn = Callable[[dict[str, Any]], None]


class TrainingDiverged(UserError):
    """The loss or gradient became non-finite; the last good checkpoint is kept."""


@dataclass
class Setup:
    """Everything a run needs, built the same way for a fresh run and a resume."""

    config: RunConfig
    run: RunDir
    model: Any
    tokenizer: Any
    params: dict[str, torch.nn.Parameter]
    report: ParamReport
    train_examples: list[Example]
    val_examples: list[Example]
    device: torch.device
    precision: str
    total_steps: int


def lr_lambda(total_steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio, as a multiplier of the peak LR."""
    warmup_steps = round(warmup * total_steps)

    def f(step: int) -> float:  # step counts optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def batch_indices(step: int, n_examples: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of the global batch of `step` (0-based), cycling epochs in seeded orders."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, within = divmod(pos, n_examples)
        out.append(_epoch_order(n_examples, seed + epoch)[within])
    return out


_ORDER_CACHE: dict[tuple[int, int], list[int]] = {}


def _epoch_order(n: int, seed: int) -> list[int]:
    key = (n, seed)
    if key not in _ORDER_CACHE:
        _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _ORDER_CACHE[key]


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, and their count."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    # Shift the labels, not the logits: the (B, T, vocab) logits stay contiguous, so they are not copied.
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    loss = F.cross_entropy(
        logits.float().view(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def validation_loss(setup: Setup) -> float | None:
    """Mean per-token loss over the validation examples."""
    if not setup.val_examples:
        return None
    was_training = setup.model.training
    setup.model.eval()
    total, count = 0.0, 0
    pad = setup.tokenizer.pad_token_id
    bs = setup.config.train.batch
    with autocast(setup.device, setup.precision):
        for i in range(0, len(setup.val_examples), bs):
            loss, n = token_loss_sum(
                setup.model, _to(collate(setup.val_examples[i : i + bs], pad), setup.device)
            )
            total, count = total + float(loss), count + n
    setup.model.train(was_training)
    return total / max(count, 1)


def prepare(config: RunConfig) -> Setup:
    """Load the base, apply the method, build the data: the same for fresh runs and resumes."""
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    device = pick_device()
    precision = choose_precision(config.train.precision, device)
    docs = load_documents(config.data.train, config.data.text_field)
    train_docs = split_documents(docs, "train", config.data.val_frac, config.data.test_frac)
    val_docs = split_documents(docs, "val", config.data.val_frac, config.data.test_frac)
    if not train_docs:
        raise UserError(f"data {', '.join(config.data.train)}: no document lands in the train split")
    loaded = load_model(config.model.name, device=device)
    tokenizer = loaded.tokenizer
    total_steps = config.train.total_steps()
    global_batch = config.train.batch * config.train.grad_accum
    train_examples = build_examples(
        train_docs,
        tokenizer,
        config.train.seq_len,
        seed=config.train.seed,
        max_examples=total_steps * global_batch,
    )
    val_examples = (
        build_examples(
            val_docs, tokenizer, config.train.seq_len, seed=0, max_examples=config.train.eval_examples
        )
        if val_docs
        else []
    )
    model = apply_method(loaded.model, config.method, base_name=config.model.name, seed=config.train.seed)
    if config.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    params = trainable_parameters(model)
    return Setup(
        config=config,
        run=RunDir(config.out),
        model=model,
        tokenizer=tokenizer,
        params=params,
        report=param_report(model),
        train_examples=train_examples,
        val_examples=val_examples,
        device=device,
        precision=precision,
        total_steps=total_steps,
    )


def _check_out(run: RunDir, overwrite: bool) -> None:
    foreign = [p for p in run.checkpoints.glob("*") if not p.name.startswith(("step-", ".step-"))]
    if foreign:  # a finished run removes checkpoints/: it must hold only adaptlab's checkpoints
        raise UserError(
            f"{run.checkpoints} holds files adaptlab did not write ({foreign[0].name}): move them"
        )
    if overwrite:
        return
    if run.is_finished():
        raise UserError(f"{run.root} holds a finished run: choose another --out, or pass --overwrite")
    if run.latest_checkpoint() is not None:
        raise UserError(
            f"{run.root} holds an unfinished run: continue it with `adaptlab train --resume {run.root}`"
        )


def train(
    config: RunConfig,
    on_start: Callable[[Setup], None] | None = None,
    on_log: LogFn | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) training to the end of its budget; write the run directory; return summary.

    The run directory is claimed and locked first (adaptlab.outputs): a directory holding files
    adaptlab did not write is refused unless `overwrite`, and a second writer is refused while this one runs.
    """
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    run = RunDir(config.out)
    with outputs.owned(run.root, "run", overwrite=overwrite or resume):
        if not resume:
            _check_out(run, overwrite)
        setup = prepare(config)
        if not resume:
            outputs.clear(run.root)  # adaptlab's own outputs only; other files stay
            run.config.write_text(config.to_yaml())
            run.metrics.write_text("")
        if on_start:
            on_start(setup)
        return _loop(setup, resume, on_log)


def resume_run(
    run_dir: str | Path, on_start: Callable[[Setup], None] | None = None, on_log: LogFn | None = None
) -> dict[str, Any]:
    """Continue an interrupted run from its latest checkpoint (or from the start if it has none)."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise UserError(f"{run.root} is not a run directory (no config.yaml)")
    if run.is_finished():
        raise UserError(f"{run.root} has already finished (summary.json exists)")
    config = build_config(load_config(run.config))
    config.out = str(run.root)
    return train(config, on_start=on_start, on_log=on_log, resume=True)


def _loop(setup: Setup, resume: bool, on_log: LogFn | None = None) -> dict[str, Any]:
    cfg, run, model, device = setup.config, setup.run, setup.model, setup.device
    t = cfg.train
    params = list(setup.params.values())
    decay = [p for n, p in setup.params.items() if p.ndim >= 2]
    no_decay = [p for n, p in setup.params.items() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.resolved_lr(),
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(setup.total_steps, t.warmup, t.min_lr_ratio)
    )
    start_step, tokens_seen, train_time, wall_before = 0, 0, 0.0, 0.0
    last_ckpt = None
    if resume and (ckpt := run.latest_checkpoint()) is not None:
        state = load_checkpoint(ckpt, setup.params, optimizer, scheduler)
        start_step, tokens_seen, train_time = state["step"], state["tokens_seen"], state["train_time_s"]
        wall_before = state["wall_s"]
        last_ckpt = ckpt
    if resume:
        run.truncate_metrics(start_step)
    if last_ckpt is None:
        seed_everything(t.seed)  # dropout and any other sampling start from the run's seed
    reset_peak(device)
    global_batch = t.batch * t.grad_accum
    pad = setup.tokenizer.pad_token_id
    n_examples = len(setup.train_examples)
    wall_start = time.perf_counter()
    loss_value = val_loss = None
    for step in range(start_step, setup.total_steps):
        step_start = time.perf_counter()
        idx = batch_indices(step, n_examples, global_batch, t.seed)
        micro = [
            collate([setup.train_examples[i] for i in idx[m * t.batch : (m + 1) * t.batch]], pad)
            for m in range(t.grad_accum)
        ]
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        step_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        total_loss = 0.0
        for b in micro:
            with autocast(device, setup.precision):
                loss_sum, _ = token_loss_sum(model, _to(b, device))
            (loss_sum / max(n_labels, 1)).backward()
            total_loss += float(loss_sum.detach())
        loss_value = total_loss / max(n_labels, 1)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            if t.max_grad_norm is not None
            else float(
                torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            )
        )
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            where = (
                f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"training diverged at step {step + 1} (loss {loss_value:.4g}, grad norm {grad_norm:.4g}): stopped; {where}. "
                "Lower --lr or use --precision fp32, then resume with `adaptlab train --resume`"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens
        dt = time.perf_counter() - step_start
        train_time += dt
        done = step + 1
        if done % t.log_every == 0 or done == setup.total_steps:
            row = {
                "step": done,
                "tokens": tokens_seen,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": step_tokens / dt,
                "mem_bytes": mem_bytes(device),
                "elapsed_s": train_time,
                "total_steps": setup.total_steps,
            }
            run.append_metrics(row)
            if on_log:
                on_log(row)
        if t.eval_every and done % t.eval_every == 0 and done < setup.total_steps:
            val_loss = validation_loss(setup)
            if val_loss is not None:
                row = {"step": done, "tokens": tokens_seen, "split": "val", "val_loss": val_loss}
                run.append_metrics(row)
                if on_log:
                    on_log(row)
        if t.save_every and done % t.save_every == 0 and done < setup.total_steps:
            last_ckpt = save_checkpoint(
                run,
                done,
                setup.params,
                optimizer,
                scheduler,
                {
                    "tokens_seen": tokens_seen,
                    "train_time_s": train_time,
                    "wall_s": wall_before + time.perf_counter() - wall_start,
                },
                keep=t.keep_checkpoints,
            )
    val_loss = validation_loss(setup)
    if val_loss is not None:
        row = {"step": setup.total_steps, "tokens": tokens_seen, "split": "val", "val_loss": val_loss}
        run.append_metrics(row)
        if on_log:
            on_log(row)
    artifact = save_artifact(setup)
    summary = {
        "method": cfg.method.method,
        "base_model": cfg.model.name,
        "trainable_params": setup.report.trainable,
        "total_params": setup.report.total,
        "peak_mem_bytes": peak_mem_bytes(device),
        "wall_s": wall_before + time.perf_counter() - wall_start,
        "train_s": train_time,
        "tokens_per_s": tokens_seen / train_time if train_time > 0 else 0.0,
        "tokens_seen": tokens_seen,
        "steps": setup.total_steps,
        "final_train_loss": loss_value if loss_value is not None else _last_train_loss(run),
        "final_val_loss": val_loss,
        "artifact": artifact.name,
        "artifact_bytes": dir_bytes(artifact),
        "precision": setup.precision,
        "device": str(device),
        "lr": cfg.resolved_lr(),
        "train_examples": n_examples,
        "versions": versions(),
    }
    if cfg.method.method == "qlora":
        from adaptlab.quantize import quantization_info

        summary["quantization"] = quantization_info(model)
    run.write_summary(summary)
    if run.checkpoints.exists():
        shutil.rmtree(run.checkpoints)  # the finished artifact supersedes the resumable state
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _last_train_loss(run: RunDir) -> float | None:
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    return losses[-1] if losses else None


def save_artifact(setup: Setup) -> Path:
    """Write RUN/adapter (PEFT format) for the LoRA family or RUN/model (HF format) for full."""
    run = setup.run
    if setup.config.method.is_lora:
        target = run.adapter
        setup.model.save_pretrained(str(target), save_embedding_layers=False)
    else:
        target = run.model
        setup.model.save_pretrained(str(target), safe_serialization=True)
        setup.tokenizer.save_pretrained(str(target))
    return target
