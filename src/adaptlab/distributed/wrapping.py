"""The data-parallel strategy of a run and the model wrapped for it: DDP replicates the model, FSDP2
(`fully_shard`) shards parameters, gradients and optimizer state, with a bf16 mixed-precision policy
on GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from adaptlab.distributed.world import World
from adaptlab.errors import UserError
from adaptlab.models import decoder_layers

PARALLEL = ("ddp", "fsdp", "auto")
# Methods whose frozen base FSDP2 cannot shard: bitsandbytes' Params4bit is not a plain tensor that
# fully_shard can split into DTensor shards.
FSDP_UNSHARDABLE = {"qlora": "its 4-bit base (bitsandbytes Params4bit) cannot be sharded by FSDP2"}


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
