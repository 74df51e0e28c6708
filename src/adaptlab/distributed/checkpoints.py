"""Checkpoints under a process group: torch.distributed.checkpoint (DCP) directories keyed by parameter
name, so a run stopped at one world size resumes at another; a single-process checkpoint loads into a
distributed run; the unsharded state dict gathered on rank 0 for the artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adaptlab.distributed.world import World, barrier
from adaptlab.distributed.wrapping import unwrap
from adaptlab.errors import UserError

DCP_MARKER = ".metadata"  # the file dcp.save writes last, in every DCP checkpoint


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
