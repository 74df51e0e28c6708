"""`train --init-from RUN`: a run that starts from another finished run's weights.

What can follow what:
  - full after full: every weight starts from RUN/model;
  - full after a LoRA-family run: the adapter is merged into the base, then every weight trains;
  - LoRA-family after a LoRA-family run: the same adapter (same method, rank, alpha, targets) keeps
    training from RUN/adapter, so the new adapter holds both trainings;
  - LoRA after full is a LoRA on another base: pass `--model RUN/model` instead.
The base (model.name) stays the original one, so learning and forgetting are measured against it.
summary.json records the chain of runs (`init_from`: newest first, each with its method, base and
final losses), and config.yaml records model.init_from, so a resume starts from the same weights.

    adaptlab train --method lora --data A --out runs/a ; adaptlab train --method lora --data B --init-from runs/a --out runs/b
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adaptlab.artifacts import ADAPTER_WEIGHTS, Artifact, resolve
from adaptlab.config import RunConfig
from adaptlab.errors import UserError
from adaptlab.rundir import RunDir

# adapter_config.json fields that must match for an adapter to keep training under a new run's config
_SAME = ("r", "lora_alpha", "use_rslora", "use_dora")


def source(config: RunConfig) -> Artifact:
    """The finished run to start from, checked against the new run's base and method."""
    init = config.model.init_from
    assert init is not None
    art = resolve(init)
    if art.run_dir is None or not RunDir(art.run_dir).is_finished():
        raise UserError(f"--init-from {init}: give a finished run directory (one with summary.json)")
    if art.base_model and art.base_model != config.model.name:
        raise UserError(
            f"--init-from {init} was trained on {art.base_model!r}, not on {config.model.name!r}: "
            f"pass --model {art.base_model}"
        )
    if art.kind == "model" and config.method.is_lora:
        raise UserError(
            f"--init-from {init} is a full fine-tuning: a {config.method.method} run on top of it is an "
            f"adapter on another base; pass --model {art.path} instead"
        )
    if config.out and Path(init).expanduser().resolve() == Path(config.out).expanduser().resolve():
        raise UserError(f"--init-from {init} is the run's own --out: choose another --out")
    return art


def load_into(model: Any, config: RunConfig) -> Any:
    """Put the weights of config.model.init_from into `model` (as apply_method returned it); return it."""
    from safetensors.torch import load_file

    art = source(config)
    if art.kind == "model":
        state = {}
        for path in sorted(art.path.glob("*.safetensors")):
            state.update(load_file(str(path)))
        _load_full(model, state, art)
    elif config.method.is_lora:
        _check_same_adapter(model, art)
        from peft import set_peft_model_state_dict

        state = load_file(str(art.path / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(model, state)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise UserError(
                f"--init-from {art.path}: the adapter lacks {missing[0]} ({len(missing)} missing)"
            )
    else:
        _merge_adapter_into(model, art)
    return model


def _load_full(model: torch.nn.Module, state: dict[str, torch.Tensor], art: Artifact) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not _tied(model, k)]
    if missing:
        raise UserError(f"--init-from {art.path}: the model lacks {missing[0]} ({len(missing)} missing)")
    with torch.no_grad():
        for name, tensor in own.items():
            if name in state:
                if state[name].shape != tensor.shape:
                    raise UserError(
                        f"--init-from {art.path}: {name} is {list(state[name].shape)} there, "
                        f"{list(tensor.shape)} in the base"
                    )
                tensor.copy_(state[name].to(tensor.dtype))


def _tied(model: Any, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _check_same_adapter(model: Any, art: Artifact) -> None:
    saved = json.loads((art.path / "adapter_config.json").read_text())
    new = model.peft_config["default"].to_dict()
    diff = [k for k in _SAME if saved.get(k) != new.get(k)]
    if sorted(saved.get("target_modules") or []) != sorted(new.get("target_modules") or []):
        diff.append("target_modules")
    if saved.get("rank_pattern") or saved.get("alpha_pattern"):
        diff.append("rank_pattern")
    if diff:
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {new.get(k)!r} here" for k in diff)
        raise UserError(
            f"--init-from {art.path}: the adapter keeps training only under the same settings ({shown}); "
            "pass the same --method, --rank, --alpha, --rslora and --targets"
        )


def _merge_adapter_into(model: Any, art: Artifact) -> None:
    """Full fine-tuning after an adapter: W0 + dW in place, the adapter layers removed again."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(art.path))
    peft_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(True)


def chain(config: RunConfig) -> list[dict[str, Any]]:
    """The runs this one started from, newest first: run, method, base, data, final losses."""
    if not config.model.init_from:
        return []
    run_dir = source(config).run_dir
    assert run_dir is not None
    summary = RunDir(run_dir).read_summary()
    parent = {
        "run": str(run_dir.resolve()),
        "method": summary.get("method"),
        "base_model": summary.get("base_model"),
        "data": _data_of(run_dir),
        "final_train_loss": summary.get("final_train_loss"),
        "final_val_loss": summary.get("final_val_loss"),
    }
    return [parent, *summary.get("init_from", [])]


def _data_of(run_dir: Path) -> list[str] | None:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["train"]
    except (OSError, KeyError, TypeError):
        return None
