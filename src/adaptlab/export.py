"""`adaptlab export --format gguf`: a tuned model or LoRA adapter as GGUF for llama.cpp and Ollama.

Written with the `gguf` package (llama.cpp's own writer), laid out as llama.cpp's converters lay it:

- a full or merged model (RUN/model, a merged HF directory, or a base model): tensors named as
  llama.cpp names them (`blk.N.attn_q.weight`, ...), attn_q/attn_k rows permuted for its rotary
  layout (convert_hf_to_gguf.py's LlamaModel.permute), 1-D tensors in F32, the model's hyperparameters
  and its tokenizer (`gpt2` BPE with merges, special ids, chat template) in the metadata;
- a LoRA adapter (RUN/adapter, a PEFT directory): the GGUF LoRA that convert_lora_to_gguf.py writes:
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and `<base tensor>.lora_a`
  (r x in) / `.lora_b` (out x r) pairs, lora_b of attn_q/attn_k permuted like their base rows.
  rsLoRA's scale alpha/sqrt(r) is written as alpha' = alpha*sqrt(r), since llama.cpp scales by alpha/r.

`--quant f16` stores 2-D tensors in F16; `q8_0` in Q8_0 (tensors whose rows are not a multiple of 32
values fall back to F16, as llama.cpp's converter does). After writing, every tensor is read back
with gguf's GGUFReader and compared with the source: F16 must equal the F16-cast source exactly;
Q8_0's error is reported and must stay within Q8_BOUND_STEPS quantization steps of its block.
`--ollama` writes a Modelfile next to it (an adapter: FROM the base exported beside it + ADAPTER).
Each GGUF is written and verified under a temp name beside it (`.NAME.XXXX.partial`) and renamed into
place only once verified, so a failed export (a full disk, a failed check) leaves no truncated .gguf.

Only llama-architecture models (LlamaForCausalLM, e.g. SmolLM2, Llama 2/3 without rope scaling)
are written; any other architecture is refused in one line naming it.

    adaptlab export runs/lora --format gguf --quant q8_0 --ollama --out gguf/lora
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError, writing

QUANTS = ("f16", "q8_0")
ARCHITECTURES = {"llama": "LlamaForCausalLM"}
"""model_type -> the HF architecture adaptlab writes as GGUF (llama.cpp's `llama`)."""
SMOLLM2_BASES = ("smollm2-135m", "tiny-random")
"""Embedded bases with the SmolLM2 tokenizer, whose llama.cpp pre-tokenizer is `smollm`."""
Q8_BLOCK = 32
Q8_BOUND_STEPS = 0.5 + 127 * 2.0**-11
"""Q8_0's worst error in units of its block's step absmax/127: half a step from rounding, plus the scale's
F16 rounding (relative 2^-11) times the largest quantized value (127)."""


@dataclass
class TensorCheck:
    name: str
    dtype: str
    shape: list[int]
    max_abs_err: float
    max_err_in_steps: float | None = None
    """Q8_0: the largest error in units of its block's quantization step (absmax/127); <= Q8_BOUND_STEPS."""


@dataclass
class ExportReport:
    kind: str  # "model" | "adapter"
    source: str
    gguf: str
    quant: str
    tensors: int
    bytes: int
    max_abs_err: float
    max_rel_err: float
    """max |gguf - source| / max |source| over all tensors."""
    exact: bool
    checks: list[TensorCheck] = field(default_factory=list)
    base_gguf: str | None = None
    modelfile: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# what a GGUF can hold


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{model_dir}/config.json is missing or unreadable: not a Hugging Face model"
        ) from None


def check_architecture(config: dict[str, Any]) -> None:
    """Raise UserError naming the architecture when adaptlab cannot write it as GGUF."""
    model_type = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    if model_type not in ARCHITECTURES or arch != ARCHITECTURES[model_type]:
        raise UserError(
            f"export --format gguf: architecture {arch} (model_type {model_type}) is not supported: adaptlab "
            "writes llama-architecture models; use llama.cpp's convert_hf_to_gguf.py for this one"
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or _rope(config).get("rope_type", "default")
    if rope_type not in (None, "default"):
        raise UserError(
            f"export --format gguf: rope scaling {rope_type!r} of this {arch} is not supported: "
            "use llama.cpp's convert_hf_to_gguf.py for this model"
        )


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def head_counts(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's, on the output rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _name_map(config: dict[str, Any]) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def gguf_name(name_map: Any, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"export --format gguf: tensor {hf_name} has no llama.cpp name")
    return found


def _permuted(hf_name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    n_head, n_kv = head_counts(config)
    if hf_name.endswith("q_proj.weight"):
        return permute(rows, n_head)
    if hf_name.endswith("k_proj.weight"):
        return permute(rows, n_kv)
    return rows


# ----------------------------------------------------------------------------------------------
# tensors to write


def model_tensors(model_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every weight of an HF llama directory (safetensors)."""
    from safetensors import safe_open

    name_map = _name_map(config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                if "rotary_emb" in key:
                    continue
                array = f.get_tensor(key).float().numpy()
                yield gguf_name(name_map, key), _permuted(key, array, config)


LORA_KEY = "base_model.model."


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{adapter_dir}/adapter_config.json is missing or unreadable") from None


def lora_alpha(cfg: dict[str, Any]) -> float:
    """The alpha llama.cpp needs (it scales by alpha/r); refuse what GGUF LoRA cannot express."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"export --format gguf: a {cfg.get('peft_type')} adapter is not a LoRA: merge it first"
        )
    if cfg.get("use_dora"):
        raise UserError(
            "export --format gguf: DoRA adapters have magnitude vectors GGUF LoRA cannot hold: "
            "merge it (`adaptlab merge`) and export the merged model"
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("export --format gguf: per-module ranks or alphas are not supported: merge it first")
    alpha, r = float(cfg.get("lora_alpha", 8)), int(cfg.get("r", 8))
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def lora_tensors(adapter_dir: Path, base_config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(`<llama.cpp base name>.lora_a|b`, fp32 array) pairs as convert_lora_to_gguf.py writes them."""
    from safetensors import safe_open

    name_map = _name_map(base_config)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        for key in keys:
            if ".lora_A." not in key and ".lora_B." not in key:
                raise UserError(
                    f"export --format gguf: {key} is not a LoRA matrix (trained embeddings or lm_head "
                    "cannot go into a GGUF LoRA): merge the adapter and export the merged model"
                )
            which = "a" if ".lora_A." in key else "b"
            base = key.removeprefix(LORA_KEY).replace(f".lora_{which.upper()}.weight", ".weight")
            if base.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise UserError(
                    f"export --format gguf: the adapter trains {base} (embeddings/lm_head), which llama.cpp "
                    "LoRA does not load: merge the adapter and export the merged model"
                )
            array = f.get_tensor(key).float().numpy()
            if which == "b":
                array = _permuted(base, array, base_config)
            yield f"{gguf_name(name_map, base)}.lora_{which}", array


# ----------------------------------------------------------------------------------------------
# write and verify


def storage_type(array: np.ndarray, quant: str) -> Any:
    """F32 for 1-D tensors; F16; Q8_0 when rows are a multiple of 32 values (else F16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return T.F32
    if quant == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return T.Q8_0
    return T.F16


def encode(array: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return array.astype(np.float32)
    if qtype == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def tokenizer_metadata(writer: Any, tok_dir: Path, config: dict[str, Any], pre: str) -> None:
    """tokenizer.ggml.*: the BPE vocabulary (gpt2 model), token types, merges, special ids, chat template."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab_size = int(config.get("vocab_size") or len(tok))
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size)
    if not special.chat_template and getattr(tok, "chat_template", None):
        special.chat_template = tok.chat_template
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = bool(getattr(tok, "add_bos_token", False))
    special.add_to_gguf(writer)
    writer.add_add_space_prefix(False)  # byte-level BPE: spaces are part of the tokens


def model_metadata(writer: Any, config: dict[str, Any], quant: str) -> None:
    import gguf

    n_head, n_kv = head_counts(config)
    hidden = int(config["hidden_size"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // n_head))
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    path: Path, tensors: Iterator[tuple[str, np.ndarray]], quant: str, metadata: Any, name: str
) -> dict[str, tuple[np.ndarray, Any]]:
    """Write a llama GGUF; return name -> (source array, storage type) for the read-back check."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    written: dict[str, tuple[np.ndarray, Any]] = {}
    try:
        writer.add_name(name)
        metadata(writer)
        for tname, array in tensors:
            qtype = storage_type(array, quant)
            data = encode(array, qtype)
            raw_dtype = qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None
            writer.add_tensor(tname, data, raw_dtype=raw_dtype)
            written[tname] = (array, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        for fout in writer.fout or []:  # the caller removes the file; its buffered bytes need not land
            with contextlib.suppress(OSError):
                fout.close()
        raise
    writer.close()
    return written


def verify(
    path: Path, written: dict[str, tuple[np.ndarray, Any]], named: Path | None = None
) -> list[TensorCheck]:
    """Read every tensor back with GGUFReader and compare it with its source (see the module docstring);
    `named` is the path errors give (the final name of a GGUF written under a temp name)."""
    import gguf

    T = gguf.GGMLQuantizationType
    named = named or path
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(written):
        raise UserError(f"{named}: read back {len(found)} tensors, {len(written)} were written")
    checks = []
    for name, (source, qtype) in written.items():
        t = found[name]
        if t.tensor_type != qtype:
            raise UserError(f"{named}: {name} reads back as {t.tensor_type.name}, not {qtype.name}")
        back = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(source.shape)
        reference = source.astype(np.float16).astype(np.float32) if qtype == T.F16 else source
        err = np.abs(back - reference)
        steps = None
        if qtype == T.Q8_0:
            blocks = np.abs(source.reshape(-1, Q8_BLOCK)).max(axis=1, keepdims=True) / 127.0
            steps = float((err.reshape(-1, Q8_BLOCK) / np.maximum(blocks, 1e-30)).max())
        checks.append(TensorCheck(name, qtype.name, list(source.shape), float(err.max()), steps))
    return checks


def _summarize(
    checks: list[TensorCheck], written: dict[str, tuple[np.ndarray, Any]]
) -> tuple[float, float, bool]:
    max_abs = max((c.max_abs_err for c in checks), default=0.0)
    scale = max((float(np.abs(a).max()) for a, _ in written.values() if a.size), default=1.0)
    exact = all(c.max_abs_err == 0.0 for c in checks if c.max_err_in_steps is None)
    return max_abs, max_abs / max(scale, 1e-30), exact


# ----------------------------------------------------------------------------------------------
# the command


def _pre_tokenizer(base: str | None) -> str:
    return "smollm" if base in SMOLLM2_BASES else "default"


def _tokenizer_dir(model_dir: Path, base: str | None) -> Path:
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        return model_dir
    from adaptlab.models import local_dir

    found = local_dir(base) if base else None
    if found is None:
        raise UserError(f"{model_dir} holds no tokenizer and its base is not local: add the tokenizer files")
    return found


def export_model_gguf(model_dir: Path, path: Path, quant: str, base: str | None, name: str) -> ExportReport:
    """A full / merged / base llama model as a GGUF model file, verified by reading it back."""
    config = read_config(model_dir)
    check_architecture(config)
    tok_dir = _tokenizer_dir(model_dir, base)

    def metadata(writer: Any) -> None:
        model_metadata(writer, config, quant)
        tokenizer_metadata(writer, tok_dir, config, _pre_tokenizer(base))

    def write(tmp: Path) -> ExportReport:
        written = write_gguf(tmp, model_tensors(model_dir, config), quant, metadata, name)
        return _report("model", model_dir, tmp, path, quant, written)

    return _write_verified(path, write)


def export_lora_gguf(adapter_dir: Path, base_dir: Path, path: Path, quant: str, name: str) -> ExportReport:
    """A LoRA adapter as a GGUF LoRA (convert_lora_to_gguf.py's layout), verified by reading it back."""
    import gguf

    config = read_config(base_dir)
    check_architecture(config)
    alpha = lora_alpha(adapter_config(adapter_dir))

    def metadata(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    def write(tmp: Path) -> ExportReport:
        written = write_gguf(tmp, lora_tensors(adapter_dir, config), quant, metadata, name)
        return _report("adapter", adapter_dir, tmp, path, quant, written)

    return _write_verified(path, write)


def _write_verified(path: Path, write: Callable[[Path], ExportReport]) -> ExportReport:
    """Run `write` on a temp file beside `path` (it writes and verifies a GGUF), then rename it to `path`.
    A failure removes the temp file: no truncated or unverified GGUF is left, and an earlier one stays."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with writing(path):
            report = write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _report(
    kind: str, source: Path, tmp: Path, path: Path, quant: str, written: dict[str, Any]
) -> ExportReport:
    """The report of the GGUF written at `tmp` (renamed to `path` next); refused unless it reads back."""
    nonfinite = next((n for n, (a, _) in written.items() if not np.isfinite(a).all()), None)
    if nonfinite is not None:  # NaN never reads back equal, and Q8_0 would hide it
        raise UserError(
            f"{source} holds non-finite weights (NaN or inf in {nonfinite}): nothing exported; "
            "train it again or export another model"
        )
    checks = verify(tmp, written, named=path)
    max_abs, max_rel, exact = _summarize(checks, written)
    bad = [c for c in checks if c.max_err_in_steps is not None and c.max_err_in_steps > Q8_BOUND_STEPS]
    if not exact or bad:
        what = (
            bad[0].name
            if bad
            else next(c.name for c in checks if c.max_abs_err and c.max_err_in_steps is None)
        )
        raise UserError(f"{path}: tensor {what} does not read back as written; the export is not usable")
    return ExportReport(
        kind, str(source), str(path), quant, len(checks), tmp.stat().st_size, max_abs, max_rel, exact, checks
    )


def modelfile(model: str, adapter: str | None, stop: str | None) -> str:
    """An Ollama Modelfile: FROM the model GGUF (+ ADAPTER the LoRA GGUF); the chat template is in the GGUF."""
    lines = [f"FROM ./{model}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def _eos_text(tok_dir: Path) -> str | None:
    try:
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    eos = cfg.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _check_fits(art: Any, base_dir: Path, spec: str) -> None:
    """Refuse an adapter made for another base (modules or shapes), from the base's config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adaptlab.artifacts import check_adapter_fits

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))
    check_adapter_fits(skeleton, art, spec, flag="--base")


def _embedded(spec: str) -> Any:
    """An embedded base model (smollm2-135m, tiny-random) as a model artifact, else None."""
    from adaptlab.artifacts import Artifact
    from adaptlab.models import EMBEDDED_MODELS, local_dir

    if spec not in EMBEDDED_MODELS:
        return None
    return Artifact("model", Path(str(local_dir(spec))), None, spec, None, None)


def export(
    source: str | Path,
    out: str | Path,
    fmt: str = "gguf",
    quant: str = "f16",
    ollama: bool = False,
    base: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Export a run directory, adapter or HF model to OUT/ (model-QUANT.gguf or adapter-QUANT.gguf,
    export.json, and with `ollama` a Modelfile; an adapter's base is exported beside it for Ollama)."""
    from adaptlab import outputs
    from adaptlab.artifacts import base_spec, resolve
    from adaptlab.models import local_dir
    from adaptlab.rundir import atomic_write

    if fmt != "gguf":
        raise UserError(f"--format {fmt!r}: only gguf is supported")
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    art = _embedded(str(source)) or resolve(source)
    out = Path(out)
    with outputs.owned(out, "export", overwrite=overwrite):
        if art.kind == "model":
            name = art.base_model if art.run_dir is None and art.base_model else art.path.name
            report = export_model_gguf(art.path, out / f"model-{quant}.gguf", quant, art.base_model, name)
            tok_dir, model_file, adapter_file = (
                _tokenizer_dir(art.path, art.base_model),
                Path(report.gguf).name,
                None,
            )
        else:
            spec = base_spec([art], base)
            base_dir = local_dir(spec)
            if base_dir is None:
                raise UserError(
                    f"base {spec!r} is not a local directory: pass --base DIR (an HF model directory)"
                )
            _check_fits(art, base_dir, spec)
            report = export_lora_gguf(
                art.path, base_dir, out / f"adapter-{quant}.gguf", quant, f"{spec} LoRA"
            )
            tok_dir, adapter_file = base_dir, Path(report.gguf).name
            model_file = None
            if ollama:
                base_report = export_model_gguf(base_dir, out / f"base-{quant}.gguf", quant, spec, spec)
                report.base_gguf, model_file = base_report.gguf, Path(base_report.gguf).name
        if ollama:
            atomic_write(out / "Modelfile", modelfile(str(model_file), adapter_file, _eos_text(tok_dir)))
            report.modelfile = str(out / "Modelfile")
        atomic_write(out / "export.json", json.dumps(report.to_json(), indent=2) + "\n")
    return report
