"""This process's place in a torchrun world: reading it from the environment, joining and leaving the
process group (gloo on CPU, nccl on CUDA), and telling a lost peer from a bug of this rank.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from adaptlab.errors import UserError

DEFAULT_TIMEOUT_S = 1800
LAUNCHED_ENV = "ADAPTLAB_NPROC_LAUNCH"  # set for ranks started by `adaptlab train --nproc`


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
