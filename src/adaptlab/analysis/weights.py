"""Weight sources for the analysis: a safetensors directory or an in-memory model, read tensor by tensor.

`base_weights` picks one for a base given as a spec, a LoadedModel or a model; 4-bit/8-bit
(bitsandbytes) layers of a loaded model are dequantized. `hf_linear_modules` lists the Linear layers of
an HF model directory without loading its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adaptlab.errors import UserError
from adaptlab.models import LoadedModel, load_model, local_dir

PEFT_PREFIX = "base_model.model."


class Weights:
    """Read-only name -> tensor access to a model's weights (keys without the '.weight' suffix)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dequantized = False

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class SafetensorsWeights(Weights):
    def __init__(self, directory: Path, label: str) -> None:
        from safetensors import safe_open

        super().__init__(label)
        files = sorted(p for p in directory.glob("*.safetensors") if not p.name.startswith("adapter_model"))
        if not files:
            raise UserError(f"{directory} has no .safetensors weights (adaptlab reads safetensors only)")
        self._file: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.endswith(".weight"):
                        name = key[: -len(".weight")]
                        self._file[name] = path
                        self.shapes[name] = tuple(f.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[name]), framework="pt") as f:
            weight = f.get_tensor(name + ".weight").float()
        if not torch.isfinite(weight).all():  # its SVD would fail with a LinAlgError
            raise UserError(
                f"{self._file[name]} holds non-finite weights (NaN or inf in {name}.weight): "
                "it cannot be analyzed; train it again or analyze another model"
            )
        return weight


class ModelWeights(Weights):
    """Weights of a loaded model; 4-bit/8-bit (bitsandbytes) layers are dequantized."""

    def __init__(self, model: Any, label: str) -> None:
        super().__init__(label)
        self._modules: dict[str, Any] = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or "lora_" in name:
                continue
            clean = name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
            self._modules[clean] = module
            quantized = type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            self.dequantized |= quantized
            shape = (module.out_features, module.in_features) if quantized else tuple(weight.shape)
            self.shapes[clean] = shape

    def get(self, name: str) -> torch.Tensor:
        module = self._modules[name]
        if type(module).__name__ == "Linear4bit":
            from adaptlab.quantize import dequantize_weight  # knows both of bitsandbytes' CPU layouts

            return dequantize_weight(module).detach().cpu()
        if type(module).__name__ == "Linear8bitLt":
            from peft.utils.integrations import dequantize_module_weight

            return dequantize_module_weight(module).detach().float().cpu()
        return module.weight.detach().float().cpu()


def base_weights(base: str | LoadedModel | Any) -> Weights:
    if isinstance(base, LoadedModel):
        if base.path is not None and not _has_quantized(base.model):
            return SafetensorsWeights(base.path, base.spec)
        return ModelWeights(base.model, base.spec)
    if isinstance(base, str):
        path = local_dir(base)
        if path is None:  # a hub id: let transformers fetch it
            return ModelWeights(load_model(base).model, base)
        return SafetensorsWeights(path, base)
    if isinstance(base, torch.nn.Module):
        label = str(getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__)
        return ModelWeights(base, label)
    raise UserError(f"base must be a model name, a directory or a loaded model, not {type(base).__name__}")


def _has_quantized(model: Any) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def hf_linear_modules(model_dir: Path) -> dict[str, bool] | None:
    """Linear (and Conv1D) module names of an HF model dir -> whether stored transposed; None if unknown.

    The model is built on the meta device (no memory, no weights). The output projection is left out,
    as peft's all-linear does.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, ImportError):
        return None
    head = model.get_output_embeddings()
    return {
        name: isinstance(m, Conv1D)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head
    }
