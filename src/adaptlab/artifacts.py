"""A tuned artifact, resolved once and loaded one way: what eval, compare, serve, merge, combine and analyze read.

`resolve(path)` says what a `--adapter` / `--tuned` path is (a run directory, a PEFT adapter
directory or an HF model directory), which base it records, which method trained it and how the
base was quantized in training. `load_tuned` builds the model those facts describe: the HF
directory for full fine-tuning; otherwise the base (quantized to NF4 for a QLoRA adapter, as in
training) with the adapter put on by `attach_adapter`, the one function that attaches an adapter.

Weights are read from safetensors only: an adapter holding only adapter_model.bin (pickle) is
refused here, before anything is loaded, and so is one whose weights are truncated or hold NaN or inf
(checked once per version of the file), so every command that reads an adapter refuses it in one line.

    python -c "from adaptlab.artifacts import resolve; print(resolve('RUN').describe())"
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from adaptlab.errors import UserError
from adaptlab.models import EMBEDDED_MODELS, STORED, LoadedModel, load_model, require_safetensors

Kind = Literal["adapter", "model"]
BaseWeights = Literal["trained", "full", "dequantized"]
BASE_WEIGHTS: tuple[str, ...] = ("trained", "full", "dequantized")
ADAPTER_WEIGHTS = "adapter_model.safetensors"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """Every fact adaptlab needs about a tuned artifact, read from its files once."""

    kind: Kind  # a LoRA-family adapter (PEFT) or a full model (HF)
    path: Path  # the PEFT adapter dir or the HF model dir itself
    run_dir: Path | None  # the run directory around it, when `adaptlab train` made it
    base_model: str | None  # the base spec recorded by the run or the adapter config
    method: str | None  # full | lora | rslora | dora | qlora; None when nothing records it
    quantization: dict[str, Any] | None  # how the base was quantized in training (QLoRA runs)

    @property
    def source(self) -> Literal["run", "adapter", "model"]:
        """What the user pointed at: a run directory, a PEFT adapter directory or an HF model directory."""
        return "run" if self.run_dir is not None else self.kind

    @property
    def trained_on_4bit(self) -> bool:
        return self.method == "qlora"

    def describe(self) -> str:
        what = "LoRA-family adapter (PEFT)" if self.kind == "adapter" else "full model (HF)"
        where = f"run directory {self.run_dir}" if self.run_dir else str(self.path)
        return f"{what} from {where}" + (f", {self.method}" if self.method else "")


# ----------------------------------------------------------------------------------------------
# resolve


def resolve(path: str | Path) -> Artifact:
    """Say what a tuned artifact is: run dir (adapter/ or model/), PEFT adapter dir, or HF model dir."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(
            f"{p}: no such file or directory (expected a run directory, a PEFT adapter or an HF model)"
        )
    if not p.is_dir():
        raise UserError(
            f"{p} is a file: expected a run directory, a PEFT adapter directory or an HF model directory"
        )
    if (p / "adapter" / "adapter_config.json").exists():
        return _adapter_artifact(p / "adapter", p)
    if (p / "model" / "config.json").exists():
        return _model_artifact(p / "model", p)
    if (p / "adapter_config.json").exists():
        run_dir = p.parent if p.name == "adapter" and (p.parent / "config.yaml").exists() else None
        return _adapter_artifact(p, run_dir)
    if (p / "config.json").exists():
        return _model_artifact(p, None)
    if (p / "config.yaml").exists() and not (p / "summary.json").exists():
        raise UserError(
            f"{p} is a run directory that has not finished (no adapter/ or model/ yet): resume it first"
        )
    raise UserError(
        f"{p} holds neither adapter/, model/, adapter_config.json nor config.json: not a tuned artifact"
    )


def _adapter_artifact(adapter_dir: Path, run_dir: Path | None) -> Artifact:
    require_safetensors(
        adapter_dir, ADAPTER_WEIGHTS, f"{adapter_dir} has adapter_config.json but no {ADAPTER_WEIGHTS}"
    )
    check_finite(adapter_dir / ADAPTER_WEIGHTS)
    config = _read_json(adapter_dir / "adapter_config.json")
    run = _run_facts(run_dir)
    return Artifact(
        kind="adapter",
        path=adapter_dir,
        run_dir=run_dir,
        base_model=run.get("base") or config.get("base_model_name_or_path"),
        method=_method(run.get("method"), _adapter_config_method(config)),
        quantization=run.get("quantization"),
    )


def check_finite(weights: Path) -> None:
    """Refuse an adapter whose weights hold NaN or inf (every output of it would be NaN), naming the file."""
    stat = weights.stat()
    bad = _non_finite_tensor(str(weights), stat.st_mtime_ns, stat.st_size)
    if bad is not None:
        raise UserError(
            f"adapter {weights} holds non-finite weights (NaN or inf in {bad}): every output of it would be "
            "NaN; train it again or use another adapter"
        )


@functools.lru_cache(maxsize=64)
def _non_finite_tensor(weights: str, mtime_ns: int, size: int) -> str | None:
    """The first tensor of a safetensors file holding NaN or inf, or None; read once per version of the file.

    Checked in numpy, on one thread: torch.isfinite (and bf16 -> fp32) took 6-15 s on a 117M-parameter
    adapter on a busy 2-core machine where this takes 0.15 s."""
    import numpy as np
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            tensor = f.get_tensor(key)
            if not tensor.is_floating_point():
                continue
            if tensor.dtype == torch.bfloat16:  # NaN and inf have every exponent bit set
                bits = tensor.view(torch.int16).numpy()
                bad = bool(((bits & 0x7F80) == 0x7F80).any())
            elif tensor.dtype in (torch.float16, torch.float32, torch.float64):
                bad = not np.isfinite(tensor.numpy()).all()
            else:  # float8 has no numpy dtype
                bad = not np.isfinite(tensor.float().numpy()).all()
            if bad:
                return key
    return None


def _model_artifact(model_dir: Path, run_dir: Path | None) -> Artifact:
    require_safetensors(model_dir)
    run = _run_facts(run_dir)
    return Artifact("model", model_dir, run_dir, run.get("base"), run.get("method") or "full", None)


def _read_json(path: Path) -> dict[str, Any]:
    return _read_mapping(path, json.loads)


def _read_yaml(path: Path) -> dict[str, Any]:
    return _read_mapping(path, yaml.safe_load)


def _read_mapping(path: Path, parse: Any) -> dict[str, Any]:
    """A JSON or YAML file's top-level mapping; {} when it is missing, unreadable or not a mapping."""
    try:
        data = parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # JSONDecodeError is a ValueError
        return {}
    return data if isinstance(data, dict) else {}


def _run_facts(run_dir: Path | None) -> dict[str, Any]:
    """base, method and quantization recorded by a run (config.yaml, summary.json); {} outside a run."""
    if run_dir is None:
        return {}
    config = _read_yaml(run_dir / "config.yaml")
    summary = _read_json(run_dir / "summary.json")
    model = config.get("model")
    method = config.get("method")
    facts: dict[str, Any] = {
        "base": (model.get("name") if isinstance(model, dict) else None) or summary.get("base_model"),
        "method": summary.get("method") or (method.get("method") if isinstance(method, dict) else None),
        "quantization": summary.get("quantization"),
    }
    return {k: v for k, v in facts.items() if v}


def _method(run_method: str | None, config_method: str | None) -> str | None:
    """The run's method, named by its variant where the adapter config says more (lora + rslora -> rslora)."""
    if run_method == "lora" and config_method in ("rslora", "dora"):
        return config_method
    return run_method or config_method


def _adapter_config_method(config: dict[str, Any]) -> str | None:
    """The LoRA variant an adapter config describes (peft records no quantization of the base)."""
    if not config:
        return None
    if isinstance(config.get("adaptlab_method"), str):
        return config["adaptlab_method"].lower()
    if config.get("use_dora"):
        return "dora"
    return "rslora" if config.get("use_rslora") else "lora"


def resolve_adapter(path: str | Path, use_instead: str = "use it directly with --model") -> Artifact:
    """resolve() for commands that need an adapter; a full model is refused with what to do instead."""
    art = resolve(path)
    if art.kind != "adapter":
        raise UserError(f"{path} is a full model ({art.describe()}), not an adapter: {use_instead}")
    return art


def base_spec(artifacts: Sequence[Artifact], base: str | None = None) -> str:
    """The base model to load: `base` when given, else the one base the artifacts record."""
    if base:
        return base
    recorded = {a.base_model for a in artifacts if a.base_model}
    if len(recorded) == 1:
        return recorded.pop()
    if len(recorded) > 1:
        raise UserError(f"the adapters record different bases ({', '.join(sorted(recorded))}): pass --base")
    raise UserError("the tuned artifact does not record its base model: pass the base (--model / --base)")


# ----------------------------------------------------------------------------------------------
# load


def load_base(
    art: Artifact,
    base: str | None = None,
    *,
    weights: BaseWeights = "trained",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """The base an adapter goes on: `trained` is what it saw in training (NF4 for QLoRA, else full precision);
    `full` the full-precision base; `dequantized` the NF4 base turned back into plain fp32 Linears.
    """
    from adaptlab.quantize import dequantize_in_place, quantize_base

    if weights not in BASE_WEIGHTS:
        raise UserError(f"base weights {weights!r}: choose one of {', '.join(BASE_WEIGHTS)}")
    quantized = weights == "dequantized" or (weights == "trained" and art.trained_on_4bit)
    # quantized from the checkpoint's own dtype, as training does (quantize_base ends in fp32)
    loaded = load_model(base_spec([art], base), dtype=STORED if quantized else dtype, device=device)
    if quantized:
        quantize_base(loaded.model, compute_dtype=_compute_dtype(art)).to(device)
    if weights == "dequantized":
        dequantize_in_place(loaded.model)
    return loaded


def _compute_dtype(art: Artifact) -> torch.dtype:
    name = (art.quantization or {}).get("compute_dtype", "float32")
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def load_tuned(
    tuned: str | Path | Artifact,
    base: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[LoadedModel, Artifact]:
    """The tuned model as trained: the HF directory of a full fine-tuning, or base + adapter (eval mode).

    `base` defaults to the base the artifact records. A QLoRA adapter goes on the base quantized to
    NF4 as in training, in bitsandbytes' original layout on every CPU.
    """
    art = tuned if isinstance(tuned, Artifact) else resolve(tuned)
    if art.kind == "model":
        return load_model(str(art.path), dtype=dtype, device=device), art
    loaded = load_base(art, base, dtype=dtype, device=device)
    model = attach_adapter(loaded.model, art, loaded.spec)
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, spec=loaded.spec, path=loaded.path), art


def attach_adapter(model: Any, art: Artifact, base: str, name: str = "default") -> Any:
    """Put a LoRA-family adapter on `model` under `name`; return the PeftModel (eval mode).

    `model` is a transformers model (wrapped in a PeftModel here) or a PeftModel (the adapter is
    added beside the ones it holds). An adapter made for another base is refused in one line
    before any weight is loaded; a failed load leaves `model` as it was.
    """
    from peft import PeftModel

    from adaptlab.quantize import keep_canonical_layout

    check_adapter_fits(model, art, base)
    try:
        if hasattr(model, "peft_config"):
            model.load_adapter(str(art.path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(art.path), adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as err:
        if hasattr(model, "peft_config") and name in model.peft_config:
            model.delete_adapter(name)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"adapter {art.path} could not be loaded onto {base!r}: {first[:200]}") from err
    keep_canonical_layout(model)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# does an adapter fit a base


def lora_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """module name in the base -> (in_features, out_features) the adapter's LoRA matrices expect."""
    from safetensors import safe_open

    a_in: dict[str, int] = {}
    b_out: dict[str, int] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            match = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
            if not match:
                continue
            module, which = match.groups()
            shape = f.get_slice(key).get_shape()
            if which == "A":
                a_in[module] = int(shape[1])  # (r, in_features)
            else:
                b_out[module] = int(shape[0])  # (out_features, r)
    return {m: (a_in[m], b_out[m]) for m in a_in if m in b_out}


def check_adapter_fits(model: Any, art: Artifact, base: str, flag: str = "--model") -> None:
    """Raise UserError when the adapter was made for another base (wrong modules or shapes); loads nothing.
    `flag` is the command's option that names the base, for the line that says what to pass."""
    recorded = art.base_model
    if recorded in EMBEDDED_MODELS and base in EMBEDDED_MODELS and recorded != base:
        raise UserError(
            f"adapter {art.path} was trained on {recorded!r}, not on {base!r}: pass {flag} {recorded}"
        )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(inner.named_modules())
    trained_on = recorded or "an unrecorded base"
    for name, (fan_in, fan_out) in sorted(lora_shapes(art.path).items()):
        module = modules.get(name)
        if module is None:
            raise UserError(
                f"adapter {art.path} (trained on {trained_on}) does not fit base {base!r}: "
                f"the base has no module {name}"
            )
        have = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if have != (fan_in, fan_out):
            raise UserError(
                f"adapter {art.path} (trained on {trained_on}) does not fit base {base!r}: "
                f"{name} is {have[0]}->{have[1]} in the base, the adapter expects {fan_in}->{fan_out}"
            )
    if recorded and not _same_model(recorded, base):  # it fits, but another model's weights are under it
        log.warning("adapter %s was trained on %r and is applied to %r here", art.path, recorded, base)


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model: equal, or the same local directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.is_dir() and pb.is_dir() and pa.resolve() == pb.resolve()
