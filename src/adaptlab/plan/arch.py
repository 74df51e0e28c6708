"""A model's architecture without its weights: shapes from the config, parameters from a meta-device build.

`load_arch` reads the config, builds the model on the meta device (no memory, no weights) and
records what the estimators need: layers, widths, heads, vocabulary, every Linear module's shape.
Trainable-parameter counts for the LoRA family follow from those shapes: a LoRA of rank r on a
Linear (in -> out) adds r * (in + out) parameters; DoRA adds a magnitude vector of `out` more.

    python -c "from adaptlab.plan.arch import load_arch; a = load_arch('smollm2-135m'); print(a.total_params)"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from adaptlab.errors import UserError
from adaptlab.fused import is_standard_mlp
from adaptlab.fused_norm import NORMS, is_standard_norm
from adaptlab.methods import linear_modules, resolve_targets

# Where each Linear's input comes from in a Llama-style block; decides which saved inputs alias.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Arch:
    """What the estimators need to know about a decoder-only causal LM."""

    spec: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    total_params: int  # each tied tensor once
    embedding_params: int  # input embedding (vocab x hidden)
    lm_head_params: int  # vocab x hidden, 0 when tied to the embedding
    norm_params: int  # everything that is neither a Linear nor an embedding
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (in, out), no lm_head
    max_positions: int | None = None  # max_position_embeddings: the longest sequence the model takes
    fused_mlp: bool = False  # training fuses its MLPs (adaptlab.fused: two saved tensors, not four)
    fused_norms: bool = False  # training rebuilds its norms' outputs in backward (adaptlab.fused_norm)
    stored_bytes: int = 4  # bytes a parameter in the checkpoint (its config's dtype; QLoRA loads in it)
    stored_bf16: bool = False  # the checkpoint is bf16 (LoRA at bf16 loads its Linears as stored)

    @property
    def linear_params(self) -> int:
        """Weights of the Linear modules in the blocks (what LoRA can target and QLoRA quantizes)."""
        return sum(i * o for i, o in self.linear_shapes.values())

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: block Linears plus the output head."""
        return self.linear_params + self.vocab * self.hidden

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def short_names(self) -> list[str]:
        return sorted({p.rsplit(".", 1)[-1] for p in self.linear_shapes})

    def per_layer(self, short: str) -> tuple[int, int] | None:
        """(in, out) of one block's module with this short name (the first one found)."""
        for path, shape in self.linear_shapes.items():
            if path.rsplit(".", 1)[-1] == short:
                return shape
        return None

    def lora_params(self, rank: int, targets: list[str], dora: bool = False) -> int:
        """Trainable parameters of a rank-r LoRA (or DoRA) on the modules named in targets."""
        total = 0
        for path, (n_in, n_out) in self.linear_shapes.items():
            if path.rsplit(".", 1)[-1] in targets:
                total += rank * (n_in + n_out) + (n_out if dora else 0)
        return total


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def load_model_config(spec: str) -> Any:
    """The transformers config of a model spec; a hub id offline fails at once, in one line."""
    from transformers import AutoConfig

    from adaptlab.hub import EMBEDDED_MODELS, require_hub
    from adaptlab.models import local_dir, quiet_transformers

    quiet_transformers()
    if spec.endswith("-healed") and spec in EMBEDDED_MODELS:  # the base's architecture: nothing to build
        spec = spec.removesuffix("-healed")
    path = local_dir(spec)
    if path is None:
        require_hub(spec)
    try:
        return AutoConfig.from_pretrained(str(path) if path else spec)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model {spec!r}: no config found ({type(err).__name__}; unknown id or offline). "
            f"Embedded models: {', '.join(EMBEDDED_MODELS)}; or pass a local Hugging Face model directory"
        ) from err


def arch_from_config(config: Any, spec: str = "") -> Arch:
    """An Arch from a transformers config, building the model on the meta device to read its shapes."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:
        raise UserError(
            f"model {spec!r}: not a causal language model transformers can build ({err})"
        ) from err
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(_cfg(text, "hidden_size", "n_embd", "d_model"))
    n_heads = int(_cfg(text, "num_attention_heads", "n_head"))
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    emb_params = emb.weight.numel()
    head_params = 0 if tied or out is None else out.weight.numel()
    shapes = {name: (m.in_features, m.out_features) for name, m in linear_modules(model).items()}
    # norms, biases and anything else that is neither a block Linear weight nor an embedding
    norm = total - emb_params - head_params - sum(i * o for i, o in shapes.values())
    return Arch(
        spec=spec,
        model_type=str(getattr(config, "model_type", "unknown")),
        n_layers=int(_cfg(text, "num_hidden_layers", "n_layer")),
        hidden=hidden,
        intermediate=int(_cfg(text, "intermediate_size", "n_inner", default=4 * hidden) or 4 * hidden),
        n_heads=n_heads,
        n_kv_heads=int(_cfg(text, "num_key_value_heads", default=n_heads)),
        head_dim=int(_cfg(text, "head_dim", default=hidden // n_heads) or hidden // n_heads),
        vocab=int(emb.weight.shape[0]),
        tied=tied,
        total_params=total,
        embedding_params=emb_params,
        lm_head_params=head_params,
        norm_params=norm,
        linear_shapes=shapes,
        max_positions=_cfg(text, "max_position_embeddings", "n_positions", default=None),
        fused_mlp=any(is_standard_mlp(m) for m in model.modules()),
        fused_norms=any(all(is_standard_norm(getattr(m, n, None)) for n in NORMS) for m in model.modules()),
        stored_bytes=_stored_bytes(config),
        stored_bf16=_stored_dtype(config) == "bfloat16",
    )


def _stored_bytes(config: Any) -> int:
    """Bytes a parameter as the checkpoint stores it, from the config's dtype (4 when it names none)."""
    return {"bfloat16": 2, "float16": 2}.get(_stored_dtype(config), 4)


def _stored_dtype(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.")


def load_arch(spec: str) -> Arch:
    """The architecture of a model spec (embedded name, local directory or hub id), without weights."""
    return arch_from_config(load_model_config(spec), spec)


def targets_for(arch: Arch, targets: str | list[str]) -> list[str]:
    """Short module names a target preset or list resolves to on this architecture (as training does)."""

    class _Shapes(torch.nn.Module):
        """A stand-in holding zero-size Linears at the real paths, for methods.resolve_targets."""

    holder = _Shapes()
    for path in arch.linear_shapes:
        parent = holder
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], torch.nn.Linear(1, 1, bias=False, device="meta"))
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return resolve_targets(holder, targets)
