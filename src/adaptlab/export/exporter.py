"""`export()`: a run directory, adapter or HF model to OUT/ as verified GGUF files, export.json and an
Ollama Modelfile. Each GGUF is written under a temp name beside its final one and renamed into place
only once it reads back as written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError, writing
from adaptlab.export.llama import check_architecture, read_config
from adaptlab.export.metadata import model_metadata, pre_tokenizer, tokenizer_metadata
from adaptlab.export.tensors import adapter_config, lora_alpha, lora_tensors, model_tensors
from adaptlab.export.writer import Q8_BOUND_STEPS, TensorCheck, summarize_checks, verify, write_gguf

QUANTS = ("f16", "q8_0")


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
        tokenizer_metadata(writer, tok_dir, config, pre_tokenizer(base))

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
    max_abs, max_rel, exact = summarize_checks(checks, written)
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
