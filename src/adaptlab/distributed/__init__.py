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

The package, one concern a module: world.py (the process group), batches.py (the global batch over
ranks), wrapping.py (DDP / FSDP2), checkpoints.py (DCP and single-process checkpoints), launch.py
(`--nproc`). Callers use it as `from adaptlab import distributed as dist`.
"""

from __future__ import annotations

from adaptlab.distributed.batches import (
    all_reduce_sum,
    all_reduce_tensor,
    check_global_batch,
    loss_scale,
    micro_batches,
    rank_slice,
)
from adaptlab.distributed.checkpoints import (
    DCP_MARKER,
    full_state,
    is_dcp_checkpoint,
    load_sharded,
    load_single,
    save_sharded,
)
from adaptlab.distributed.launch import RunStopped, launch
from adaptlab.distributed.world import (
    DEFAULT_TIMEOUT_S,
    LAUNCHED_ENV,
    SINGLE,
    RankLost,
    World,
    barrier,
    close_world,
    device_for,
    first_line,
    init_world,
    launched_by_torchrun,
    peer_failure,
    timeout_s,
    world_from_env,
)
from adaptlab.distributed.wrapping import (
    FSDP_UNSHARDABLE,
    PARALLEL,
    as_float,
    check_parallel,
    gradient_sync,
    resolve_parallel,
    unwrap,
    wrap,
)

__all__ = [
    "DCP_MARKER",
    "DEFAULT_TIMEOUT_S",
    "FSDP_UNSHARDABLE",
    "LAUNCHED_ENV",
    "PARALLEL",
    "RankLost",
    "RunStopped",
    "SINGLE",
    "World",
    "all_reduce_sum",
    "all_reduce_tensor",
    "as_float",
    "barrier",
    "check_global_batch",
    "check_parallel",
    "close_world",
    "device_for",
    "first_line",
    "full_state",
    "gradient_sync",
    "init_world",
    "is_dcp_checkpoint",
    "launch",
    "launched_by_torchrun",
    "load_sharded",
    "load_single",
    "loss_scale",
    "micro_batches",
    "peer_failure",
    "rank_slice",
    "resolve_parallel",
    "save_sharded",
    "timeout_s",
    "unwrap",
    "world_from_env",
    "wrap",
]
