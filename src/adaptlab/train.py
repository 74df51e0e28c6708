"""The one training loop, for every method: AdamW, warmup + cosine, accumulation, clipping, checkpoints.

Methods differ only in which parameters train (methods.py) and what is saved at the end (an adapter
or a model); everything else here is shared, so a comparison compares methods, not loops.

The unit of a step is the global batch (batch x grad_accum examples). Example order is a pure
function of (seed, step): epoch e uses randperm(n, seed + e), so a resumed run sees exactly the data
an uninterrupted one would. The loss of a step is the sum of token losses over the global batch
divided by its number of label tokens, so batch 4 x accum 1 and batch 1 x accum 4 take the same step.
Under torchrun (distributed.py) each of N ranks takes its contiguous 1/N of the same global batch and
the label-token count is summed over ranks, so N processes take the same steps as one.

The loop is a sequence of named parts: build_optimizer / build_scheduler, micro_batches (the data of
a step), train_step (forward, backward, clip, update), the periodic evaluation and checkpoint, and
build_summary. Every file written while training goes through a RunWriter.

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

from adaptlab import distributed as dist
from adaptlab.config import RunConfig, TrainSpec, build_config, load_config
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
    world: dist.World = dist.SINGLE
    parallel: str | None = None
    """ddp | fsdp when several processes train this run, else None."""


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


def prepare(config: RunConfig, world: dist.World = dist.SINGLE, parallel: str | None = None) -> Setup:
    """Load the base, apply the method, build the data: the same for fresh runs and resumes.

    Under a process group the model is wrapped (DDP or FSDP2) and `params` are the wrapped model's.
    """
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    device = dist.device_for(world) if world.distributed else pick_device()
    precision = choose_precision(config.train.precision, device)
    docs = load_documents(config.data.train, config.data.text_field)
    train_docs = split_documents(docs, "train", config.data.val_frac, config.data.test_frac)
    val_docs = split_documents(docs, "val", config.data.val_frac, config.data.test_frac)
    if not train_docs:
        raise UserError(f"data {', '.join(config.data.train)}: no document lands in the train split")
    strategy = dist.resolve_parallel(parallel, config.method.method, world, _fits_one_device(config, device))
    # FSDP2 loads on the CPU and moves only each rank's shards to its device
    loaded = load_model(config.model.name, device="cpu" if strategy == "fsdp" else device)
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
    if strategy != "fsdp":
        model.to(device)
    model.train()
    report = param_report(model)
    model = dist.wrap(model, strategy, device, precision)
    return Setup(
        config=config,
        run=RunDir(config.out),
        model=model,
        tokenizer=tokenizer,
        params=trainable_parameters(dist.unwrap(model)),
        report=report,
        train_examples=train_examples,
        val_examples=val_examples,
        device=device,
        precision=precision,
        total_steps=total_steps,
        world=world,
        parallel=strategy,
    )


def _fits_one_device(config: RunConfig, device: torch.device) -> bool | None:
    """Whether a whole replica fits one GPU (what --parallel auto asks); None when it cannot be told."""
    if device.type != "cuda":
        return None
    from adaptlab.plan.world import fits_one_device

    t = config.train
    try:
        memory = torch.cuda.get_device_properties(device).total_memory
        return fits_one_device(config.model.name, config.method.method, t.batch, t.seq_len, "bf16", memory)
    except (UserError, KeyError, ValueError):
        return None


def _check_out(run: RunDir) -> None:
    if not run.root.exists():
        return
    if run.is_finished():
        raise UserError(f"{run.root} holds a finished run: choose another --out")
    if run.latest_checkpoint() is not None:
        raise UserError(
            f"{run.root} holds an unfinished run: continue it with `adaptlab train --resume {run.root}`"
        )
    if any(p for p in run.root.iterdir() if p.name not in ("config.yaml", "metrics.jsonl", "checkpoints")):
        raise UserError(f"{run.root} exists and is not a run directory: choose another --out")


def train(
    config: RunConfig,
    on_start: Callable[[Setup], None] | None = None,
    on_log: LogFn | None = None,
    resume: bool = False,
    parallel: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) training to the end of its budget; write the run directory; return summary.

    Under torchrun every rank calls this: rank 0 writes the run directory, every rank trains its slice.
    `parallel` (ddp | fsdp | auto) picks how several processes share the model.
    """
    run = RunDir(config.out or "")
    world = dist.world_from_env()
    dist.check_parallel(parallel, config.method.method, world)
    dist.check_global_batch(config.train.batch * config.train.grad_accum, world)
    if not resume and world.is_main:
        _check_out(run)
    world = dist.init_world()
    try:
        setup = prepare(config, world, parallel)
        if world.is_main:
            run.root.mkdir(parents=True, exist_ok=True)
            if not resume:
                run.config.write_text(config.to_yaml())
                run.metrics.write_text("")
                if run.checkpoints.exists():
                    shutil.rmtree(run.checkpoints)
        dist.barrier()
        if on_start and world.is_main:
            on_start(setup)
        return _loop(setup, resume, on_log)
    except RuntimeError as err:
        if not dist.peer_failure(err, world):
            raise
        raise dist.RankLost(
            f"rank {world.rank}: another process of this run stopped ({dist.first_line(err)}); "
            f"the last good checkpoint is kept: continue with `adaptlab train --resume {run.root}`"
        ) from None
    finally:
        dist.close_world()


def resume_run(
    run_dir: str | Path,
    on_start: Callable[[Setup], None] | None = None,
    on_log: LogFn | None = None,
    parallel: str | None = None,
) -> dict[str, Any]:
    """Continue an interrupted run from its latest checkpoint (or from the start if it has none)."""
    run = RunDir(run_dir)
    if not run.config.exists():
        raise UserError(f"{run.root} is not a run directory (no config.yaml)")
    if run.is_finished():
        raise UserError(f"{run.root} has already finished (summary.json exists)")
    config = build_config(load_config(run.config))
    config.out = str(run.root)
    return train(config, on_start=on_start, on_log=on_log, resume=True, parallel=parallel)


def _loop(setup: Setup, resume: bool, on_log: LogFn | None = None) -> dict[str, Any]:
    """Train from the start (or the latest checkpoint) to the end of the budget; return the summary."""
    t = setup.config.train
    optimizer = build_optimizer(setup.params, t, setup.config.resolved_lr())
    scheduler = build_scheduler(optimizer, setup.total_steps, t)
    writer = (
        RankWriter(setup.run, on_log, t.keep_checkpoints, setup.world, setup.model)
        if setup.world.distributed
        else RunWriter(setup.run, on_log, keep=t.keep_checkpoints)
    )
    progress = _restore(setup, optimizer, scheduler, writer) if resume else Progress()
    if progress.checkpoint is None:
        seed_everything(t.seed)  # dropout and any other sampling start from the run's seed
    reset_peak(setup.device)
    progress.start_clock()
    result = None
    for step in range(progress.step, setup.total_steps):
        result = train_step(setup, micro_batches(setup, step), optimizer, scheduler)
        check_finite(step + 1, result, progress.checkpoint)
        progress.advance(result)
        _log_step(setup, writer, progress, result)
        _evaluate_if_due(setup, writer, progress)
        _checkpoint_if_due(setup, writer, progress, optimizer, scheduler)
    val_loss = _evaluate(setup, writer, progress)
    artifact = save_artifact(setup)
    final_loss = result.loss if result is not None else _last_train_loss(setup.run)
    summary = build_summary(setup, progress, artifact, final_loss, val_loss)
    writer.finish(summary)
    return summary


def build_optimizer(params: dict[str, torch.nn.Parameter], t: TrainSpec, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms do not decay)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, t: TrainSpec) -> Any:
    """Linear warmup then cosine decay, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, t.warmup, t.min_lr_ratio))


@dataclass
class Progress:
    """Where a run stands: the counters a checkpoint saves and a resume restores, and the run's clock."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    wall_before: float = 0.0
    """Wall time spent before this process started (by the runs this one resumes)."""
    checkpoint: Path | None = None
    """The newest checkpoint written or resumed from."""
    wall_start: float = 0.0

    def start_clock(self) -> None:
        self.wall_start = time.perf_counter()

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start

    def advance(self, result: StepResult) -> None:
        self.step += 1
        self.tokens_seen += result.tokens
        self.train_time += result.seconds

    def state(self) -> dict[str, Any]:
        """What state.json records next to the tensors of a checkpoint."""
        return {"tokens_seen": self.tokens_seen, "train_time_s": self.train_time, "wall_s": self.wall_s()}


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    """Mean per-token loss over the global batch."""
    grad_norm: float
    lr: float
    """The learning rate the step used."""
    tokens: int
    """Tokens (attention-mask ones) in the global batch."""
    seconds: float


class RunWriter:
    """Every file a run writes while it trains: metrics rows, checkpoints, then the summary.

    The loop writes nothing else, so a run of several processes gives all but one of them a writer
    that writes nothing.
    """

    def __init__(self, run: RunDir, on_log: LogFn | None = None, keep: int = 2) -> None:
        self.run = run
        self.on_log = on_log
        self.keep = keep

    def log(self, row: dict[str, Any]) -> None:
        self.run.append_metrics(row)
        if self.on_log:
            self.on_log(row)

    def rewind(self, step: int) -> None:
        """Drop the metrics rows logged after `step` (a resume repeats those steps)."""
        self.run.truncate_metrics(step)

    def checkpoint(
        self, step: int, params: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any, state: dict
    ) -> Path:
        return save_checkpoint(self.run, step, params, optimizer, scheduler, state, keep=self.keep)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json; the finished artifact supersedes the resumable state."""
        self.run.write_summary(summary)
        if self.run.checkpoints.exists():
            shutil.rmtree(self.run.checkpoints)


class RankWriter(RunWriter):
    """The writer of one rank of several: rank 0 writes metrics and the summary, and every rank writes
    its shards of a checkpoint (torch.distributed.checkpoint), which rank 0 then renames into place."""

    def __init__(self, run: RunDir, on_log: LogFn | None, keep: int, world: dist.World, model: Any) -> None:
        super().__init__(run, on_log if world.is_main else None, keep)
        self.world = world
        self.model = model

    def log(self, row: dict[str, Any]) -> None:
        if self.world.is_main:
            super().log(row)

    def rewind(self, step: int) -> None:
        if self.world.is_main:
            super().rewind(step)
        dist.barrier()

    def checkpoint(
        self, step: int, params: dict[str, torch.nn.Parameter], optimizer: Any, scheduler: Any, state: dict
    ) -> Path:
        return dist.save_sharded(
            self.run.checkpoints, step, self.model, optimizer, scheduler, state, self.keep, self.world
        )

    def finish(self, summary: dict[str, Any]) -> None:
        if self.world.is_main:
            super().finish(summary)
        dist.barrier()


def _load_any(setup: Setup, ckpt: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """A checkpoint written at any world size: DCP (several processes) or the single-process format."""
    if dist.is_dcp_checkpoint(ckpt):
        return dist.load_sharded(ckpt, setup.model, optimizer, scheduler)
    if setup.world.distributed:
        return dist.load_single(ckpt, setup.model, optimizer, scheduler)
    return load_checkpoint(ckpt, setup.params, optimizer, scheduler)


def _restore(setup: Setup, optimizer: Any, scheduler: Any, writer: RunWriter) -> Progress:
    """Progress of the run being resumed: its latest checkpoint's state, or the start if it has none."""
    progress = Progress()
    if (ckpt := setup.run.latest_checkpoint()) is not None:
        state = _load_any(setup, ckpt, optimizer, scheduler)
        progress = Progress(
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            train_time=state["train_time_s"],
            wall_before=state["wall_s"],
            checkpoint=ckpt,
        )
    writer.rewind(progress.step)
    return progress


def micro_batches(setup: Setup, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of the global batch of `step`, as collated micro-batches of at most `batch` examples.

    One process: grad_accum micro-batches of `batch`. N ranks: rank r's contiguous 1/N of the same
    global batch, cut into micro-batches of at most `batch`.
    """
    t = setup.config.train
    idx = batch_indices(step, len(setup.train_examples), t.batch * t.grad_accum, t.seed)
    pad = setup.tokenizer.pad_token_id
    return [
        collate([setup.train_examples[i] for i in chunk], pad)
        for chunk in dist.micro_batches(dist.rank_slice(idx, setup.world), t.batch)
    ]


def train_step(
    setup: Setup, micro: list[dict[str, torch.Tensor]], optimizer: Any, scheduler: Any
) -> StepResult:
    """One optimizer step over the global batch `micro`: forward and backward per micro-batch, clip, update.

    Each micro-batch's summed loss is divided by the label tokens of the whole global batch (summed
    over ranks), so the accumulated gradient is that of the global batch's mean token loss however it
    is cut, over micro-batches or over ranks.
    """
    start = time.perf_counter()
    device = setup.device
    local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    n_labels = max(dist.all_reduce_sum(local_labels, device), 1)
    scale = dist.loss_scale(setup.world) / n_labels
    total_loss = 0.0
    for m, b in enumerate(micro):
        with dist.gradient_sync(setup.model, m == len(micro) - 1):
            with autocast(device, setup.precision):
                loss_sum, _ = token_loss_sum(setup.model, _to(b, device))
            (loss_sum * scale).backward()
        total_loss += float(loss_sum.detach())
    norm = grad_norm(list(setup.params.values()), setup.config.train.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=dist.all_reduce_sum(total_loss, device) / n_labels,
        grad_norm=norm,
        lr=lr,
        tokens=int(dist.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro), device)),
        seconds=time.perf_counter() - start,
    )


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The global gradient norm, clipping the gradients to max_norm when it is set."""
    if max_norm is not None:
        return dist.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return dist.as_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def check_finite(step: int, result: StepResult, checkpoint: Path | None) -> None:
    """Stop the run when the loss or the gradient norm is no longer finite."""
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return
    where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    raise TrainingDiverged(
        f"training diverged at step {step} (loss {result.loss:.4g}, grad norm {result.grad_norm:.4g}): "
        f"stopped; {where}. Lower --lr or use --precision fp32, then resume with `adaptlab train --resume`"
    )


def _log_step(setup: Setup, writer: RunWriter, progress: Progress, result: StepResult) -> None:
    done = progress.step
    if done % setup.config.train.log_every and done != setup.total_steps:
        return
    writer.log(
        {
            "step": done,
            "tokens": progress.tokens_seen,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / result.seconds,
            "mem_bytes": mem_bytes(setup.device),
            "elapsed_s": progress.train_time,
            "total_steps": setup.total_steps,
        }
    )


def _evaluate_if_due(setup: Setup, writer: RunWriter, progress: Progress) -> None:
    every = setup.config.train.eval_every
    if every and progress.step % every == 0 and progress.step < setup.total_steps:
        _evaluate(setup, writer, progress)


def _evaluate(setup: Setup, writer: RunWriter, progress: Progress) -> float | None:
    """Validation loss now, logged as an eval row."""
    val_loss = validation_loss(setup)
    if val_loss is not None:
        writer.log(
            {"step": progress.step, "tokens": progress.tokens_seen, "split": "val", "val_loss": val_loss}
        )
    return val_loss


def _checkpoint_if_due(
    setup: Setup, writer: RunWriter, progress: Progress, optimizer: Any, scheduler: Any
) -> None:
    every = setup.config.train.save_every
    if every and progress.step % every == 0 and progress.step < setup.total_steps:
        progress.checkpoint = writer.checkpoint(
            progress.step, setup.params, optimizer, scheduler, progress.state()
        )


def build_summary(
    setup: Setup, progress: Progress, artifact: Path, final_loss: float | None, val_loss: float | None
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
        "final_val_loss": val_loss,
        "artifact": artifact.name,
        "artifact_bytes": dir_bytes(artifact),
        "precision": setup.precision,
        "device": str(setup.device),
        "lr": cfg.resolved_lr(),
        "train_examples": len(setup.train_examples),
        "versions": versions(),
        "world_size": setup.world.world_size,
        "parallel": setup.parallel,
    }
    if cfg.method.method == "qlora":
        from adaptlab.quantize import quantization_info

        summary["quantization"] = quantization_info(setup.model)
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _last_train_loss(run: RunDir) -> float | None:
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    return losses[-1] if losses else None


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
        if is_lora:
            model.save_pretrained(str(target), save_embedding_layers=False, state_dict=state)
        else:
            model.save_pretrained(str(target), safe_serialization=True, state_dict=state)
            setup.tokenizer.save_pretrained(str(target))
    dist.barrier()
    return target
