"""Weight-update analysis: how a LoRA-family adapter or a full fine-tuning changed each Linear layer.

For every adapted Linear layer the update dW is built through one code path for both kinds
(`layer_updates`): LoRA family (LoRA, rsLoRA, DoRA, QLoRA) from the PEFT adapter files,
scaling * B @ A (DoRA: the merged weight minus W0); full fine-tuning as W_tuned - W_base matched
by module name. `layer_stats` then measures, batched over layers of equal shape:
  - ||dW||_F and ||dW||_F / ||W0||_F;
  - effective rank (singular values of dW needed for 90% of its energy) and stable rank
    (||dW||_F^2 / ||dW||_2^2);
  - intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): for each of the top-k left
    singular vectors of W0 + dW, the largest |cosine| with any left singular vector of W0; an
    intruder if that is below eps.
Weights are read from safetensors directly; no model is built and no forward pass runs.
Matrices are taken in nn.Linear orientation (out, in), so left singular vectors live in the
output space (GPT-2 style Conv1D weights are transposed first).

    python -c "from adaptlab.analysis import analyze; print(analyze('tiny-random', 'RUN')['totals'])"
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptlab.artifacts import resolve
from adaptlab.errors import UserError
from adaptlab.models import EMBEDDED_MODELS, LoadedModel, load_model, local_dir

DEFAULT_K = 10
DEFAULT_EPS = 0.5
ENERGY = 0.9  # fraction of ||dW||_F^2 that the effective rank covers
EPS_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MODULE_TYPES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
_PEFT_PREFIX = "base_model.model."


@dataclass
class LayerUpdate:
    """One adapted Linear layer: its base weight and the update, both (out, in) fp32."""

    name: str  # full module path, e.g. model.layers.0.self_attn.q_proj
    w0: torch.Tensor  # (out, in)
    dw: torch.Tensor  # (out, in)


@dataclass
class UpdateSet:
    """Every layer update of one tuned artifact, with where it came from."""

    layers: list[LayerUpdate]
    kind: str  # "adapter" | "model"
    method: str  # lora | rslora | dora | qlora | full (or what the run recorded)
    base: str  # what W0 was read from
    tuned: str  # the adapter or model directory
    base_note: str
    skipped: list[dict[str, str]] = field(default_factory=list)


def module_type(name: str) -> str:
    """q/k/v/o/gate/up/down for Llama-style names; otherwise the module's own last name."""
    last = name.rsplit(".", 1)[-1]
    return MODULE_TYPES.get(last, last)


def layer_index(name: str) -> int | None:
    """Depth of a module from the first integer in its path (model.layers.7.mlp.up_proj -> 7)."""
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------
# Weight sources: a safetensors directory or an in-memory model, read tensor by tensor.


class _Weights:
    """Read-only name -> tensor access to a model's weights (keys without the '.weight' suffix)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dequantized = False

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


class _SafetensorsWeights(_Weights):
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


class _ModelWeights(_Weights):
    """Weights of a loaded model; 4-bit/8-bit (bitsandbytes) layers are dequantized."""

    def __init__(self, model: Any, label: str) -> None:
        super().__init__(label)
        self._modules: dict[str, Any] = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or "lora_" in name:
                continue
            clean = name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")
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


def _base_weights(base: str | LoadedModel | Any) -> _Weights:
    if isinstance(base, LoadedModel):
        if base.path is not None and not _has_quantized(base.model):
            return _SafetensorsWeights(base.path, base.spec)
        return _ModelWeights(base.model, base.spec)
    if isinstance(base, str):
        path = local_dir(base)
        if path is None:  # a hub id: let transformers fetch it
            return _ModelWeights(load_model(base).model, base)
        return _SafetensorsWeights(path, base)
    if isinstance(base, torch.nn.Module):
        label = str(getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__)
        return _ModelWeights(base, label)
    raise UserError(f"base must be a model name, a directory or a loaded model, not {type(base).__name__}")


def _has_quantized(model: Any) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def _linear_modules(model_dir: Path) -> dict[str, bool] | None:
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


# ---------------------------------------------------------------------------------------------
# dW: one code path for adapters and full models.


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module path suffix (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _adapter_updates(weights: _Weights, adapter_dir: Path) -> tuple[list[LayerUpdate], list[dict]]:
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{adapter_dir} is a {cfg.get('peft_type')} adapter: only the LoRA family "
            "(LoRA, rsLoRA, DoRA, QLoRA) can be analysed"
        )
    file = adapter_dir / "adapter_model.safetensors"
    if not file.exists():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors (adaptlab reads safetensors only)")
    tensors = load_file(str(file))
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    skipped = [
        {"name": k.removeprefix(_PEFT_PREFIX).split(".lora_embedding")[0], "reason": "embedding LoRA"}
        for k in tensors
        if ".lora_embedding_A" in k
    ]
    names = sorted(
        k.removeprefix(_PEFT_PREFIX)[: -len(".lora_A.weight")]
        for k in tensors
        if k.endswith(".lora_A.weight")
    )
    if not names:
        raise UserError(f"{adapter_dir} holds no LoRA Linear weights (lora_A/lora_B)")
    updates = []
    for name in names:
        key = _PEFT_PREFIX + name
        a = tensors[key + ".lora_A.weight"].float()  # (r, in)
        b = tensors[key + ".lora_B.weight"].float()  # (out, r)
        if name not in weights.shapes:
            near = ", ".join(n for n in list(weights.shapes)[:4])
            raise UserError(
                f"adapter {adapter_dir} does not fit base {weights.label!r}: the base has no module {name} "
                f"(it has e.g. {near})"
            )
        shape = weights.shapes[name]
        want = (b.shape[0], a.shape[1])
        if shape != (want[::-1] if fan_in_fan_out else want):
            raise UserError(
                f"adapter {adapter_dir} does not fit base {weights.label!r}: {name} is {list(want)} "
                f"(out, in) in the adapter but {list(shape)} in the base"
            )
        w0 = weights.get(name)
        w0 = w0.T.contiguous() if fan_in_fan_out else w0  # (out, in)
        r = a.shape[0]
        lora_alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r
        dw = scaling * (b @ a)  # (out, in)
        magnitude = tensors.get(
            key + ".lora_magnitude_vector", tensors.get(key + ".lora_magnitude_vector.weight")
        )
        if magnitude is not None:
            # DoRA (peft): W' = m * (W0 + s BA) / ||W0 + s BA||, the norm taken per output row.
            merged = w0 + dw
            merged = (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
            dw = merged - w0
        updates.append(LayerUpdate(name, w0, dw))
    return updates, skipped


def _model_updates(weights: _Weights, model_dir: Path) -> tuple[list[LayerUpdate], list[dict]]:
    tuned = _SafetensorsWeights(model_dir, str(model_dir))
    linear = _linear_modules(model_dir)
    if linear is None:  # unknown architecture: every 2-D weight except embeddings and the head
        skip = ("embed", "wte", "wpe", "lm_head")
        linear = {n: False for n, s in tuned.shapes.items() if len(s) == 2 and not any(x in n for x in skip)}
    names = [n for n in linear if n in tuned.shapes]
    missing = [n for n in names if n not in weights.shapes]
    if missing or not names:
        raise UserError(
            f"{model_dir} does not fit base {weights.label!r}: "
            + (
                f"the base has no module {missing[0]} ({len(missing)} missing)"
                if missing
                else "no Linear weights"
            )
        )
    updates = []
    for name in names:
        if tuned.shapes[name] != weights.shapes[name]:
            raise UserError(
                f"{model_dir} does not fit base {weights.label!r}: {name} is {list(tuned.shapes[name])} "
                f"in the tuned model but {list(weights.shapes[name])} in the base"
            )
        w0, w1 = weights.get(name), tuned.get(name)
        if linear[name]:
            w0, w1 = w0.T.contiguous(), w1.T.contiguous()
        updates.append(LayerUpdate(name, w0, w1 - w0))
    return updates, []


def layer_updates(base: str | LoadedModel | Any | None, tuned_path: str | Path) -> UpdateSet:
    """W0 and dW of every adapted Linear layer, through one code path for adapters and full models.

    base: a model spec (embedded name, HF dir, hub id), a LoadedModel or a model; None means the base
    recorded by the run or adapter. A QLoRA adapter is measured against this base (dequantized when it
    is a 4-bit model).
    """
    ref = resolve(tuned_path)
    if base is None:
        base = ref.base_model
        if not base:
            raise UserError(f"{ref.path} does not record its base model: pass it with --base")
    weights = _base_weights(base)
    if ref.kind == "adapter":
        layers, skipped = _adapter_updates(weights, ref.path)
    else:
        layers, skipped = _model_updates(weights, ref.path)
    method = ref.method or ref.kind
    notes = [f"W0 read from {weights.label}"]
    if weights.dequantized:
        notes.append("dequantized from its 4-bit/8-bit layers")
    if weights.label == "smollm2-135m":
        notes.append("SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF, not the original bf16 weights")
    if method == "qlora":
        notes.append(
            "QLoRA: dW is the adapter's update alone; the 4-bit base it trained on differs from this W0 "
            "by quantization error, which is not counted in dW"
        )
    recorded = ref.base_model
    if isinstance(base, str) and recorded and recorded != base and _same_base(recorded, base) is False:
        notes.append(f"the tuned artifact records base {recorded!r}")
    return UpdateSet(layers, ref.kind, method, weights.label, str(ref.path), "; ".join(notes), skipped)


def _same_base(a: str, b: str) -> bool | None:
    """Whether two base specs name the same local model; None when that cannot be told offline."""
    try:
        pa = local_dir(a) if a in EMBEDDED_MODELS or Path(a).expanduser().is_dir() else None
        pb = local_dir(b) if b in EMBEDDED_MODELS or Path(b).expanduser().is_dir() else None
    except UserError:
        return None
    if pa is None or pb is None:
        return None
    return pa.resolve() == pb.resolve()


# ---------------------------------------------------------------------------------------------
# Spectra and intruder dimensions, batched over layers of equal shape.


def _top_left_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of each matrix in a (N, out, in) stack -> (N, out, k).

    Taken from the eigenvectors of the smaller Gram matrix (the same vectors as the SVD's for
    distinct top singular values, up to sign, which |cosine| ignores) at a fraction of a full SVD.
    """
    out, inp = w.shape[-2:]
    if out <= inp:
        _, vecs = torch.linalg.eigh(w @ w.transpose(-1, -2))  # ascending eigenvalues
        return vecs[..., -k:].flip(-1)
    vals, vecs = torch.linalg.eigh(w.transpose(-1, -2) @ w)  # (N, in, in): right singular vectors
    v = vecs[..., -k:].flip(-1)  # (N, in, k)
    s = vals[..., -k:].flip(-1).clamp_min(1e-30).sqrt()  # (N, k)
    return (w @ v) / s.unsqueeze(-2)


def _gram_spectrum(dw: torch.Tensor) -> torch.Tensor:
    """Squared singular values of each (out, in) matrix in a stack, descending -> (N, min(out, in))."""
    out, inp = dw.shape[-2:]
    gram = dw @ dw.transpose(-1, -2) if out <= inp else dw.transpose(-1, -2) @ dw
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).double()


def intruder_max_cos(w0: torch.Tensor, dw: torch.Tensor, k: int) -> torch.Tensor:
    """For each top-k left singular vector of W0 + dW, the largest |cos| with any left singular vector of W0.

    w0, dw: (N, out, in) stacks; returns (N, min(k, out, in)), ordered by the tuned singular values.
    """
    k = min(k, *w0.shape[-2:])
    u_base = torch.linalg.svd(w0, full_matrices=False).U  # (N, out, min(out, in))
    u_tuned = _top_left_vectors(w0 + dw, k)  # (N, out, k)
    return (u_tuned.transpose(-1, -2) @ u_base).abs().amax(dim=-1)  # (N, k)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with at most n torch threads, restoring the caller's setting afterwards."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def layer_stats(
    layers: list[LayerUpdate], k: int = DEFAULT_K, eps: float = DEFAULT_EPS
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Norms, effective and stable rank, and intruder counts per layer; also seconds per layer shape."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        groups[tuple(layer.w0.shape)].append(i)
    rows: list[dict[str, Any]] = [{} for _ in layers]
    timing: dict[str, Any] = {}
    for shape, idx in groups.items():
        start = time.perf_counter()
        # Small matrices gain nothing from threads, and batched LAPACK calls under a busy CPU lose a lot.
        with _torch_threads(1 if max(shape) < 256 else torch.get_num_threads()):
            rows_j = _group_stats([layers[i] for i in idx], shape, k, eps)
        for i, row in zip(idx, rows_j):
            rows[i] = row
        timing[f"{shape[0]}x{shape[1]}"] = {"layers": len(idx), "seconds": time.perf_counter() - start}
    return rows, timing


def _group_stats(
    layers: list[LayerUpdate], shape: tuple[int, int], k: int, eps: float
) -> list[dict[str, Any]]:
    """layer_stats for layers of one shape, stacked into (N, out, in) batches."""
    w0 = torch.stack([layer.w0 for layer in layers])  # (N, out, in)
    dw = torch.stack([layer.dw for layer in layers])  # (N, out, in)
    upd = torch.linalg.matrix_norm(dw).double()  # (N,)
    ref = torch.linalg.matrix_norm(w0).double()  # (N,)
    energy = _gram_spectrum(dw)  # (N, min(out, in)): s_i^2 of dW, descending
    cum = energy.cumsum(-1)
    total = cum[:, -1]
    eff_rank = ((cum < ENERGY * total[:, None]).sum(-1) + 1).where(total > 0, 0)
    stable = (upd**2 / energy[:, 0].clamp_min(1e-300)).where(total > 0, 0.0)
    max_cos = torch.ones(len(layers), min(k, *shape))
    nonzero = [j for j in range(len(layers)) if bool(dw[j].any())]  # dW == 0: the tuned spectrum is W0's
    if nonzero:
        max_cos[nonzero] = intruder_max_cos(w0[nonzero], dw[nonzero], k)
    return [
        {
            "name": layer.name,
            "module_type": module_type(layer.name),
            "layer": layer_index(layer.name),
            "shape": list(shape),
            "update_norm": float(upd[j]),
            "base_norm": float(ref[j]),
            "rel_update_norm": float(upd[j] / ref[j]) if ref[j] > 0 else None,
            "effective_rank": int(eff_rank[j]),
            "stable_rank": float(stable[j]),
            "intruders": int((max_cos[j] < eps).sum()),
            "max_cos": [round(float(c), 5) for c in max_cos[j]],
        }
        for j, layer in enumerate(layers)
    ]


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    upd2 = sum(r["update_norm"] ** 2 for r in rows)
    ref2 = sum(r["base_norm"] ** 2 for r in rows)
    rel = [r["rel_update_norm"] for r in rows if r["rel_update_norm"] is not None]
    return {
        "layers": len(rows),
        "intruders": sum(r["intruders"] for r in rows),
        "layers_with_intruders": sum(r["intruders"] > 0 for r in rows),
        "update_norm": math.sqrt(upd2),
        "rel_update_norm": math.sqrt(upd2 / ref2) if ref2 > 0 else None,
        "mean_rel_update_norm": sum(rel) / len(rel) if rel else None,
        "mean_effective_rank": sum(r["effective_rank"] for r in rows) / len(rows),
        "mean_stable_rank": sum(r["stable_rank"] for r in rows) / len(rows),
    }


def _type_key(t: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t)


def summarize(rows: list[dict[str, Any]], eps: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Totals (all, per module type, per depth) and the eps sweep, from per-layer rows."""
    by_type: dict[str, list] = defaultdict(list)
    by_depth: dict[str, list] = defaultdict(list)
    for r in rows:
        by_type[r["module_type"]].append(r)
        by_depth["-" if r["layer"] is None else str(r["layer"])].append(r)
    totals = _aggregate(rows) if rows else {}
    totals["by_module_type"] = {t: _aggregate(by_type[t]) for t in sorted(by_type, key=_type_key)}
    depth_key = lambda d: (d == "-", int(d) if d != "-" else 0)  # noqa: E731
    totals["by_layer"] = {d: _aggregate(by_depth[d]) for d in sorted(by_depth, key=depth_key)}
    sweep = {}
    for e in sorted({*EPS_SWEEP, eps}):
        counts = [sum(c < e for c in r["max_cos"]) for r in rows]
        sweep[f"{e:g}"] = {"intruders": sum(counts), "layers_with_intruders": sum(c > 0 for c in counts)}
    return totals, sweep


def analyze(
    base_spec_or_model: str | LoadedModel | Any | None,
    tuned_path: str | Path,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Analyse how a tuned artifact changed its base; write OUT/analysis.json and heatmaps when out_dir is set.

    Returns {"k", "eps", "energy", "base", "tuned", "kind", "method", "base_note", "layers": [...],
    "totals": {..., "by_module_type", "by_layer"}, "eps_sweep": {eps: {...}}, "skipped", "timing"}.
    """
    if not isinstance(k, int) or k < 1:
        raise UserError(f"--k must be a positive integer, got {k!r}")
    if not 0 < eps <= 1:
        raise UserError(f"--eps must be in (0, 1], got {eps!r}")
    start = time.perf_counter()
    updates = layer_updates(base_spec_or_model, tuned_path)
    load_s = time.perf_counter() - start
    order = sorted(
        range(len(updates.layers)),
        key=lambda i: (
            layer_index(updates.layers[i].name) is None,
            layer_index(updates.layers[i].name) or 0,
            _type_key(module_type(updates.layers[i].name)),
            updates.layers[i].name,
        ),
    )
    rows, shapes = layer_stats([updates.layers[i] for i in order], k, eps)
    totals, sweep = summarize(rows, eps)
    result: dict[str, Any] = {
        "k": k,
        "eps": eps,
        "energy": ENERGY,
        "base": updates.base,
        "tuned": updates.tuned,
        "kind": updates.kind,
        "method": updates.method,
        "base_note": updates.base_note,
        "layers": rows,
        "totals": totals,
        "eps_sweep": sweep,
        "skipped": updates.skipped,
        "timing": {"load_s": load_s, "shapes": shapes, "total_s": time.perf_counter() - start},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["heatmaps"] = [str(p) for p in heatmaps(result, out)]
        (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def heatmaps(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Two PNGs, layers x module types: intruder counts and relative update norms."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["layers"]
    types = sorted({r["module_type"] for r in rows}, key=_type_key)
    depths = sorted({r["layer"] for r in rows}, key=lambda d: (d is None, d or 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for field_name, title, fname, cmap in (
        (
            "intruders",
            f"intruder dimensions (k={result['k']}, eps={result['eps']:g})",
            "intruders.png",
            "Reds",
        ),
        ("rel_update_norm", "relative update norm ||dW|| / ||W0||", "rel_update_norm.png", "viridis"),
    ):
        grid = np.full((len(depths), len(types)), np.nan)
        for r in rows:
            value = r[field_name]
            if value is not None:
                grid[depths.index(r["layer"]), types.index(r["module_type"])] = value
        fig = Figure(figsize=(1.2 + 0.8 * len(types), 1.5 + 0.28 * len(depths)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        vmax = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-12)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(depths)), ["-" if d is None else str(d) for d in depths])
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        if field_name == "intruders" and len(depths) <= 40:
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value) and value > 0:
                    color = "white" if value > 0.6 * vmax else "black"
                    ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
