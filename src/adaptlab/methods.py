"""Apply a method to a base model: full fine-tuning or the LoRA family (LoRA, rsLoRA, DoRA) via peft.

Methods differ only in which parameters train and what is saved; the training loop is the same.
Targets are resolved against the Linear modules the model really has, and a target that matches
nothing lists the ones that exist.

    python -c "from adaptlab.models import load_model; from adaptlab.methods import *; \
m = load_model('tiny-random').model; print(linear_module_names(m))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptlab.config import TARGET_PRESETS, MethodSpec, RunConfig, check_rank, check_seq_len
from adaptlab.errors import UserError

_ATTENTION_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


@dataclass
class ParamReport:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} / {self.total:,} ({100 * self.fraction:.3f}%)"


def param_report(model: nn.Module) -> ParamReport:
    """Trainable and total parameters, each tied tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        # bitsandbytes 4-bit weights store two values per byte
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return ParamReport(trainable, total)


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear-like module except the output head, by full module path."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            out[name] = module
    return out


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct short names (q_proj, up_proj, ...) of the Linear modules a LoRA can target."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def resolve_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Short module names for a preset (attention | mlp | all-linear) or an explicit list."""
    modules = linear_modules(model)
    names = linear_module_names(model)
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise UserError(
                f"unknown targets {targets!r}; choose one of {', '.join(TARGET_PRESETS)} or a list of module names "
                f"({', '.join(names)})"
            )
        if targets == "all-linear":
            return names
        hints = _ATTENTION_HINTS if targets == "attention" else _MLP_HINTS
        chosen = sorted(
            {n.rsplit(".", 1)[-1] for n in modules if any(h in n.rsplit(".", 1)[0].lower() for h in hints)}
        )
        if not chosen:
            raise UserError(
                f"targets {targets!r} match no module in this model; Linear modules: {', '.join(names)}"
            )
        return chosen
    missing = [t for t in targets if t not in names]
    if missing:
        raise UserError(
            f"targets {', '.join(missing)} match no Linear module; the model has: {', '.join(names)}"
        )
    return list(targets)


def lora_config(model: nn.Module, spec: MethodSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.dropout,
        target_modules=resolve_targets(model, spec.targets),
        use_rslora=spec.rslora,
        use_dora=spec.method == "dora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_method(
    model: nn.Module, spec: MethodSpec, base_name: str | None = None, seed: int = 0
) -> nn.Module:
    """Return the model ready to train: all weights trainable (full) or a PeftModel (LoRA family)."""
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if spec.method == "qlora":
        from adaptlab.quantize import quantize_base

        model = quantize_base(model)
    from peft import get_peft_model

    config = lora_config(model, spec)
    with torch.random.fork_rng():  # adapter init must not disturb the run's RNG stream
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named trainable parameters (tied ones once), in a stable order: what a checkpoint stores."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def check_against_model(config: RunConfig, model: Any) -> None:
    """Bounds only the loaded model knows: seq_len within its positions, rank within the targeted Linears."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    check_seq_len(config.train.seq_len, positions, config.model.name)
    if config.method.is_lora:
        check_rank(config.method.rank, _targeted_shapes(model, config.method.targets))


def _targeted_shapes(model: Any, targets: str | list[str]) -> dict[str, tuple[int, int]]:
    names = set(resolve_targets(model, targets))
    return {
        n: (m.in_features, m.out_features)
        for n, m in linear_modules(model).items()
        if n.rsplit(".", 1)[-1] in names
    }
