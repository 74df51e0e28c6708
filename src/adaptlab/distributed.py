"""One run on many processes: the torchrun world, DDP / FSDP2 wrapping, rank slices, sharded checkpoints.

`torchrun --nproc-per-node N -m adaptlab train ...` starts N copies of the same loop. Each reads its
place in the world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), joins
the process group (gloo on CPU, nccl on CUDA) and takes its slice of the same global batch, so N
processes at one global batch take the same optimizer steps as one process (the loss is normalised by
the global batch's label-token count, all-reduced). DDP replicates the model; FSDP2 (`fully_shard`)
shards parameters, gradients and optimizer state, with a bf16 mixed-precision policy on GPUs.
Only rank 0 writes metrics, summary and artifacts; the artifact is gathered to the same PEFT adapter or
HF model directory a single process writes. Checkpoints under a process group are
torch.distributed.checkpoint (DCP) directories keyed by parameter name, so a run stopped at one world
size resumes at another (a single-process checkpoint loads into a distributed run and vice versa).

    torchrun --nproc-per-node 2 -m adaptlab train --model tiny-random --method lora --steps 4 --out runs/d
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptlab.errors import UserError
from adaptlab.models import decoder_layers

PARALLEL = ("ddp", "fsdp", "auto")
DEFAULT_TIMEOUT_S = 1800
# Methods whose frozen base FSDP2 cannot shard: bitsandbytes' Params4bit is not a plain tensor that
# fully_shard can split into DTensor shards.
FSDP_UNSHARDABLE = {"qlora": "its 4-bit base (bitsandbytes Params4bit) cannot be sharded by FSDP2"}
LAUNCHED_ENV = "ADAPTLAB_NPROC_LAUNCH"  # set for ranks started by `adaptlab train --nproc`
DCP_MARKER = ".metadata"  # the file dcp.save writes last, in every DCP checkpoint


class RankLost(UserError):
    """Another process of the run stopped (killed, out of memory, lost node): this one stops too."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r}: expected an integer (set by torchrun)"
        ) from None


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher speaking its protocol) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world_from_env() -> World:
    """This process's rank, world size and local rank from torchrun's environment (one process without it)."""
    if not launched_by_torchrun():
        return SINGLE
    world = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if not 0 <= world.rank < world.world_size:
        raise UserError(f"RANK={world.rank} is outside WORLD_SIZE={world.world_size}: check the launcher")
    return world


def device_for(world: World) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a GPU machine, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def timeout_s() -> float:
    """Seconds a collective (and joining the group) may wait for the other ranks: $ADAPTLAB_DIST_TIMEOUT."""
    value = os.environ.get("ADAPTLAB_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        return float(value)
    except ValueError:
        raise UserError(f"ADAPTLAB_DIST_TIMEOUT={value!r}: expected seconds") from None


def init_world() -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); one process: nothing to join."""
    world = world_from_env()
    if not launched_by_torchrun() or torch.distributed.is_initialized():
        return world
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    device = device_for(world)
    try:
        torch.distributed.init_process_group(
            backend,
            rank=world.rank,
            world_size=world.world_size,
            timeout=datetime.timedelta(seconds=timeout_s()),
            device_id=device if device.type == "cuda" else None,
        )
    except (RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"rank {world.rank} could not join the {backend} process group at {where} ({first[:200]}): "
            "check MASTER_ADDR/MASTER_PORT and that every node started torchrun with the same rendezvous"
        ) from None
    return world


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "timed out", "timeout")


def peer_failure(err: BaseException, world: World) -> bool:
    """Whether a collective failed because another rank went away (not a bug in this one)."""
    if not world.distributed and world.world_size == 1:
        return False
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err).lower()
    return any(sign in text for sign in _PEER_SIGNS)


def close_world() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------------- data


def check_global_batch(global_batch: int, world: World) -> None:
    """The global batch (batch x grad-accum) must split evenly over the ranks."""
    if global_batch % world.world_size:
        raise UserError(
            f"world size {world.world_size} does not divide the global batch {global_batch} (batch x grad-accum): "
            f"choose a batch x grad-accum that is a multiple of {world.world_size}, or another number of processes"
        )


def rank_slice(indices: list[int], world: World) -> list[int]:
    """This rank's contiguous share of the global batch's example indices (same order on every rank)."""
    share = len(indices) // world.world_size
    return indices[world.rank * share : (world.rank + 1) * share]


def micro_batches(indices: list[int], batch: int) -> list[list[int]]:
    """A rank's share cut into micro-batches of at most `batch` examples."""
    return [indices[i : i + batch] for i in range(0, len(indices), batch)]


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """The sum of `value` over every rank (the value itself in one process)."""
    return float(all_reduce_tensor(torch.tensor([float(value)], dtype=torch.float64), device).item())


def all_reduce_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The elementwise sum of a CPU tensor over every rank, summed in float64 on the process group's
    device (the tensor itself in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    on = t.to(device, dtype=torch.float64)
    torch.distributed.all_reduce(on)
    return on.to("cpu", dtype=t.dtype)


def loss_scale(world: World) -> float:
    """Multiplier of a rank's loss so the data-parallel gradient mean becomes the global-batch sum.

    DDP and FSDP2 average gradients over ranks; each rank's loss is its token-loss sum over the
    global batch's label count, so the exact gradient is the sum over ranks: world_size x the mean.
    """
    return float(world.world_size)


# ---------------------------------------------------------------------------------------- wrapping


def check_parallel(parallel: str | None, method: str, world: World) -> None:
    """Refuse a strategy that cannot run this method, before anything is written."""
    if parallel is None:
        return
    if parallel not in PARALLEL:
        raise UserError(f"--parallel {parallel!r}: choose one of {', '.join(PARALLEL)}")
    if parallel == "fsdp" and method in FSDP_UNSHARDABLE:
        raise UserError(
            f"--parallel fsdp cannot train {method}: {FSDP_UNSHARDABLE[method]}; "
            "use --parallel ddp (each rank holds the 4-bit base, which is what QLoRA keeps small)"
        )


def resolve_parallel(
    parallel: str | None, method: str, world: World, fits_one_device: bool | None = None
) -> str | None:
    """The strategy to use: None in one process; `auto` is FSDP when the model does not fit one device."""
    if not world.distributed or world.world_size == 1:
        return None
    if parallel in (None, "auto"):
        if method in FSDP_UNSHARDABLE or fits_one_device is not False:
            return "ddp"
        return "fsdp"
    return parallel


def wrap(model: nn.Module, parallel: str | None, device: torch.device, precision: str) -> nn.Module:
    """DDP or FSDP2 around the model (the model itself in one process)."""
    if parallel is None:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if device.type == "cuda" and precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP (FSDP2 shards in place: the model is itself)."""
    return getattr(model, "module", model) if model.__class__.__name__ == "DistributedDataParallel" else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but a step's last micro-batch (the sum is the same)."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def as_float(t: torch.Tensor | float) -> float:
    """A Python float from a tensor that may be a DTensor (FSDP2's gradient norm)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return float(t)


# ------------------------------------------------------------------------------------- checkpoints


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / DCP_MARKER).exists()


def _state_options(full: bool = False, strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=strict)


def _trained_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's trainable tensors and the optimizer's state, keyed by parameter name (a collective).

    ignore_frozen_params drops a frozen parameter under its first name only: a frozen head tied to the
    frozen embeddings (LoRA on a tied model) would stay under its second name, a copy of the vocabulary
    matrix in every checkpoint. Every name of a frozen parameter is dropped here.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    frozen = {n for n, p in unwrap(model).named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def _broadcast_text(text: str) -> str:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def save_sharded(
    checkpoints: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int,
    world: World,
) -> Path:
    """Write RUN/checkpoints/step-N as a DCP directory: every rank writes its shards into a temp dir,
    rank 0 adds state.json (step, scheduler, RNG) and renames it into place; the newest `keep` stay."""
    import torch.distributed.checkpoint as dcp

    from adaptlab.rundir import replace_dir, rng_state, write_manifest

    final = checkpoints / f"step-{step}"
    tmp = checkpoints / f".step-{step}.tmp"
    if world.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = _trained_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if world.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "extra.pt")
        (tmp / "state.json").write_text(
            json.dumps({"step": step, "world_size": world.world_size, "format": "dcp", **state}, indent=2)
        )
        write_manifest(tmp, "dcp")  # last: the checkpoint verifies only when every shard was written
        replace_dir(tmp, final)
        older = sorted(
            (p for p in checkpoints.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1])
        )
        for p in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return final


def load_sharded(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore a DCP checkpoint written at any world size into this run's (wrapped or plain) model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from adaptlab.rundir import set_rng_state

    model_sd, optim_sd = _trained_state(model, optimizer)
    target = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(target, checkpoint_id=str(path))
    except (RuntimeError, KeyError) as err:
        raise UserError(
            f"checkpoint {path} does not match this run's trainable parameters ({str(err).splitlines()[0][:160]}): "
            "was the config edited?"
        ) from None
    # the checkpoint holds the trained tensors only (dcp.load has checked every one is there): the
    # frozen base stays as this run loaded it, so a strict load would miss its keys
    set_state_dict(
        model,
        optimizer,
        model_state_dict=target["model"],
        optim_state_dict=target["optim"],
        options=_state_options(strict=False),
    )
    extra = torch.load(path / "extra.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((path / "state.json").read_text())


def load_single(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore a single-process checkpoint (trainable.safetensors + optimizer.pt) into a distributed run.

    The optimizer state there is keyed by position in the optimizer's parameter groups; it is re-keyed
    by parameter name and set as a full state dict, which DDP copies and FSDP2 shards.
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from adaptlab.rundir import set_rng_state

    name_of = {id(p): n for n, p in unwrap(model).named_parameters()}
    params = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        raise UserError(
            f"checkpoint {path} does not match this run's trainable parameters: was the config edited?"
        )
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    opt = blob["optimizer"]
    by_name = {
        "state": {params[int(i)]: s for i, s in opt["state"].items()},
        "param_groups": [{**g, "params": [params[int(i)] for i in g["params"]]} for g in opt["param_groups"]],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())


def full_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (CPU); a collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    for alias in _tied_aliases(unwrap(model)):  # tied weights are saved once, as one process saves them
        state.pop(alias, None)
    return state


def _tied_aliases(model: nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier one (a tied head after its embedding)."""
    seen: set[int] = set()
    aliases = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.append(name)
        seen.add(id(p))
    return aliases


# ---------------------------------------------------------------------------------------- launching


class RunStopped(Exception):
    """A process of a run launched with --nproc stopped it; `code` is the exit status to return."""

    def __init__(self, message: str | None, code: int) -> None:
        super().__init__(message or "")
        self.message = message
        self.code = code


def launch(nproc: int, argv: list[str], run_dir: str | None) -> str | None:
    """Run `adaptlab train ARGV` on `nproc` local processes, as `torchrun --standalone` would.

    Uses torchrun's own launcher (torch.distributed.launcher), which stops every rank when one fails.
    A rank that exits with a user error has printed its line already (RunStopped code 2); a rank killed
    by a signal or crashing becomes one line naming it (RunStopped code 1). A rank that died after rank 0
    wrote RUN/summary.json (during this launch) stopped nothing: the run is complete, and the line naming
    that rank is returned, not raised (None when every rank exited cleanly).
    """
    import logging
    import time

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # what `torchrun --standalone` sets up: a rendezvous on a free local port
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4())]
    args = parse_args([*rdzv, "--nproc-per-node", str(nproc), "-m", "adaptlab", "train", *argv])
    config, cmd, cmd_args = config_from_args(args)
    os.environ[LAUNCHED_ENV] = "1"  # the ranks inherit it: a rank that loses a peer stays quiet
    started = time.time()
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as err:
        finished = run_dir is not None and _written_since(Path(run_dir) / "summary.json", started)
        message, code = _failure_line(err, run_dir, finished)
        if code == 0:
            return message
        raise RunStopped(message, code) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return None


def _written_since(path: Path, since: float) -> bool:
    """Whether path exists and was last written at or after `since` (a time.time())."""
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _failure_line(err: Any, run_dir: str | None, finished: bool = False) -> tuple[str | None, int]:
    """What the launcher says of failed ranks, and its exit status; `finished`: this launch's run wrote
    its summary.json, so a rank that died stopped nothing (status 0)."""
    failures = sorted(err.failures.items(), key=lambda kv: kv[1].timestamp)
    if all(f.exitcode == 2 for _, f in failures):
        return None, 2  # a user error: rank 0 printed it
    rank, first = next(((r, f) for r, f in failures if f.exitcode != 2), failures[0])
    how = (
        f"was killed by {first.signal_name()}"
        if first.exitcode < 0
        else f"exited with status {first.exitcode}"
    )
    where = run_dir or "RUN"
    if finished:
        return (
            f"rank {rank} {how} after the run finished: {where}/summary.json and its artifact are complete",
            0,
        )
    return (
        f"rank {rank} {how}: the run stopped on every rank; the last good checkpoint is kept: "
        f"continue with `adaptlab train --resume {where}`",
        1,
    )
