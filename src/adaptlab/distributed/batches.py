"""The global batch across ranks: its even split, each rank's slice and micro-batches, sums over ranks
(all-reduce), and the loss scale that turns the data-parallel gradient mean into the global-batch sum.
"""

from __future__ import annotations

import torch

from adaptlab.distributed.world import World
from adaptlab.errors import UserError


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
