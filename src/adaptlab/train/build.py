"""What a run trains: the base loaded as its transforms need it, the method and transforms applied,
the data built, and the model wrapped for DDP or FSDP2 (`prepare`, the same for fresh runs and resumes)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from adaptlab import compiling
from adaptlab import distributed as dist
from adaptlab.autocast_linear import fuse_autocast_linears
from adaptlab.config import RunConfig
from adaptlab.cpu_attention import use_cpu_attention
from adaptlab.errors import UserError
from adaptlab.frozen_base import adapters_in_fp32, hold_frozen_linears, load_held
from adaptlab.fused import fuse_mlps
from adaptlab.fused_lora import fuse_loras
from adaptlab.fused_norm import fuse_norms
from adaptlab.hardware import choose_precision, pick_device
from adaptlab.methods import apply_method, check_against_model, param_report, trainable_parameters
from adaptlab.models import STORED, load_model
from adaptlab.objectives import objective_for
from adaptlab.run_setup import Setup
from adaptlab.rundir import RunDir
from adaptlab.transforms import Transforms, loads_held, transforms_for

log = logging.getLogger("adaptlab.train")


FitsOneDevice = Callable[[RunConfig, torch.device], "bool | None"]
"""Whether a whole replica of the run fits one device (None when it cannot be told): what `--parallel auto`
asks; the caller supplies it (the command line asks the planner's memory model)."""


def prepare(
    config: RunConfig,
    world: dist.World = dist.SINGLE,
    parallel: str | None = None,
    fits_one_device: FitsOneDevice | None = None,
) -> Setup:
    """Load the base, apply the method, build the data: the same for fresh runs and resumes.

    Under a process group the model is wrapped (DDP or FSDP2) and `params` are the wrapped model's.
    """
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    device = dist.device_for(world) if world.distributed else pick_device()
    precision = choose_precision(config.train.precision, device)
    objective = objective_for(config)
    fits = fits_one_device(config, device) if fits_one_device and world.distributed else None
    strategy = dist.resolve_parallel(parallel, config.method.method, world, fits)
    loaded = load_base(config, device, precision, strategy)
    check_against_model(config, loaded.model)
    transforms = transforms_for(
        config, device, precision, strategy, sum(p.numel() for p in loaded.model.parameters())
    )
    # auto turning it on is said: the first step then takes tens of seconds longer while it compiles
    (log.warning if transforms.compile and config.train.compile == "auto" else log.debug)(
        transforms.why["compile"]
    )
    tokenizer = loaded.tokenizer
    train_examples, val_examples = objective.build_data(config, tokenizer)
    model = build_model(loaded.model, config, transforms, device, strategy)
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
        total_steps=config.train.total_steps(),
        world=world,
        parallel=strategy,
        compiled=transforms.compile,
        objective=objective,
        transforms=transforms,
    )


def load_base(config: RunConfig, device: torch.device, precision: str, strategy: str | None) -> Any:
    """The run's base (models.LoadedModel), loaded as its transforms need it.

    FSDP2 loads on the CPU and moves only each rank's shards to its device. QLoRA quantizes from the
    checkpoint's own dtype, and LoRA at bf16 keeps a bf16 checkpoint's Linears as stored (frozen_base.py):
    neither holds the base whole in fp32.
    """
    if loads_held(config.method.method, precision, strategy):
        return load_held(config.model.name, device)
    dtype = STORED if config.method.method == "qlora" else torch.float32
    return load_model(config.model.name, dtype=dtype, device="cpu" if strategy == "fsdp" else device)


def build_model(
    base: Any, config: RunConfig, transforms: Transforms, device: torch.device, strategy: str | None
) -> Any:
    """The method applied to `base`, then each of `transforms` (adaptlab.transforms), on `device` unless
    FSDP2 shards it there (distributed.wrap)."""
    with adapters_in_fp32() if transforms.load_held else nullcontext():
        model = apply_method(base, config.method, base_name=config.model.name, seed=config.train.seed)
    if config.model.init_from:  # another run's weights (init_from.py)
        from adaptlab import init_from

        model = init_from.load_into(model, config)
    # bit-identical to the plain MLP, two (tokens x intermediate) tensors less per block
    fuse_mlps(model, recompute_product=transforms.recompute_mlp_product)
    if transforms.fuse_lora:  # LoRA's adapter passes folded into accumulating matmuls
        fuse_loras(model)
    if transforms.fuse_linears:
        fuse_autocast_linears(model)  # under autocast, trained Linears keep fp32 tensors, not bf16 casts
    if transforms.fuse_norms:
        fuse_norms(model)  # a block's norms keep their input only; their outputs are rebuilt in backward
    if config.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if transforms.cpu_attention:
        use_cpu_attention(model)  # torch's flash forward, a faster backward of fused matmuls
    if transforms.hold_base_bf16:
        hold_frozen_linears(model)  # the bf16 values autocast would cast them to at every call
    if strategy != "fsdp":
        model.to(device)
    if transforms.compile:
        compiling.compile_layers(model, device)
    return model
