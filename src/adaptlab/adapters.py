"""Adapters in production: merge one into its base, combine several into one, check they fit a base.

- `merge_adapter`: base + LoRA-family adapter -> a plain HF model directory (safetensors), verified by
  comparing the logits of the written model with the unmerged base+adapter on sample batches.
- `combine_adapters`: several adapters on one base -> one adapter (peft's `add_weighted_adapter`:
  linear, cat or ties), then the NLL per token of base, each source adapter and the combination on
  each domain's held-out text and on a general probe, so the interference is measured, not guessed.
Adapters are resolved, their base loaded and attached through artifacts.py. Both claim and lock their
output directory (outputs.py) while they write it, so two processes never share one.

    adaptlab merge --base tiny-random --adapter RUN --out merged/
    adaptlab combine --base tiny-random --adapter A --adapter B --how cat --data a.jsonl --data b.jsonl --out ab/
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adaptlab import outputs
from adaptlab.artifacts import Artifact, BaseWeights, attach_adapter, base_spec, load_base, resolve_adapter
from adaptlab.errors import UserError, writing
from adaptlab.models import load_model

MergeTarget = Literal["full", "dequantized"]
MERGE_TARGETS: tuple[str, ...] = ("full", "dequantized")
Combination = Literal["linear", "cat", "ties"]
COMBINATIONS: tuple[str, ...] = ("linear", "cat", "ties")
DEFAULT_TIES_DENSITY = 0.2  # the TIES paper keeps the top 20% of each task vector

# Short, varied texts for the merge check: prose, code, a chat turn, digits. Two batches of unequal
# lengths so padding is exercised.
CHECK_TEXTS: tuple[tuple[str, ...], ...] = (
    (
        "The committee met on Tuesday to review the budget for the coming year.",
        "def add(a, b):\n    return a + b\n",
        "<|im_start|>user\nWhat is a lighthouse?<|im_end|>\n<|im_start|>assistant\nA tower with a light",
    ),
    (
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
        "3.14159 2.71828 1.41421",
    ),
)


# ----------------------------------------------------------------------------------------------
# output directories


def _check_empty(out: Path) -> None:
    """Raise UserError when `out` holds anything beyond adaptlab's marker and lock."""
    if out.exists() and any(p.name not in (outputs.MARKER, outputs.LOCK) for p in out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new --out directory")


@contextlib.contextmanager
def _claimed(out: Path) -> Iterator[Path]:
    """Claim `out` and hold its lock (adaptlab.outputs) while the block builds the result in a temp dir
    beside it, which _publish moves into `out` once verified: a second writer is refused while this one
    runs, and a failure leaves no half-written output."""
    outputs.not_a_file(out)
    _check_empty(out)
    with outputs.owned(out, "artifact"):
        _check_empty(out)  # again under the lock: another writer may have finished in the meantime
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, out: Path, report_name: str, report: Any) -> None:
    """Move the verified result from `tmp` into `out`, the report (a dataclass) last: an output with its
    report is complete. The report is written into `tmp` first, so a full disk stops it before anything
    moves."""
    with writing(out / report_name):
        (tmp / report_name).write_text(json.dumps(asdict(report), indent=2) + "\n")
    for item in tmp.iterdir():
        if item.name != report_name:
            os.replace(item, out / item.name)
    os.replace(tmp / report_name, out / report_name)


# ----------------------------------------------------------------------------------------------
# merge


@dataclass
class MergeReport:
    """What `merge_adapter` wrote and how closely the written model reproduces base + adapter."""

    out: str
    base: str
    adapter: str
    method: str | None
    into: str
    dtype: str
    max_abs_diff: float  # max |logits(written model) - logits(base + adapter)| over CHECK_TEXTS tokens, fp32
    max_abs_diff_fp64: float | None  # the same computed in fp64, when the fp32 figure reached the tolerance
    tolerance: float
    tokens_checked: int


def _batch_logits(
    model: Any, tokenizer: Any, texts: Sequence[str], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # (B, T, V)
    return logits.to(dtype), enc["attention_mask"].bool()


def _merge_base(into: MergeTarget | None) -> BaseWeights:
    """Which base weights a merge writes into: the dequantized NF4 base or the full-precision one."""
    return "dequantized" if into == "dequantized" else "full"


def _fp64_merge_diff(
    spec: str,
    art: Artifact,
    written_dir: Path,
    check_texts: Sequence[Sequence[str]],
    into: MergeTarget | None,
) -> float:
    """Max abs logit difference between the written weights and base + adapter, both computed in fp64."""
    from transformers import AutoModelForCausalLM

    loaded = load_base(art, spec, weights=_merge_base(into))
    model = attach_adapter(loaded.model, art, spec).double().eval()
    written = AutoModelForCausalLM.from_pretrained(written_dir, dtype=torch.float64).eval()
    worst = 0.0
    for texts in check_texts:
        want, mask = _batch_logits(model, loaded.tokenizer, texts, torch.float64)
        got, _ = _batch_logits(written, loaded.tokenizer, texts, torch.float64)
        worst = max(worst, (got - want).abs()[mask].max().item())
    return worst


def merge_adapter(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    *,
    into: MergeTarget | None = None,
    tolerance: float = 1e-4,
    check_texts: Sequence[Sequence[str]] = CHECK_TEXTS,
) -> MergeReport:
    """Merge a LoRA-family adapter into its base and write a plain HF model directory to `out`.

    The written directory is reloaded with AutoModelForCausalLM and its logits compared with the
    unmerged base + adapter on `check_texts` in fp32; when that reaches `tolerance` (fp32 rounding
    over many layers can), both sides are recomputed in fp64, and a max abs difference >= `tolerance`
    there too fails the merge and leaves nothing at `out`. `into` matters only for QLoRA adapters (trained against a 4-bit
    base): 'full' merges into the full-precision base, 'dequantized' into the 4-bit base turned back
    into floats (what the adapter saw in training).
    """
    from transformers import AutoModelForCausalLM

    art = resolve_adapter(adapter, "it has nothing to merge; use it directly with --model")
    method = art.method
    if into not in (None, *MERGE_TARGETS):
        raise UserError(f"--into {into!r}: choose one of {', '.join(MERGE_TARGETS)}")
    if method == "qlora" and into is None:
        raise UserError(
            f"{adapter} is a QLoRA adapter (trained on a 4-bit base): choose --into full (merge into the "
            "full-precision base; outputs shift slightly from the 4-bit model it was trained with) or "
            "--into dequantized (merge into the dequantized 4-bit base)"
        )
    if into == "dequantized" and method != "qlora":
        raise UserError(
            f"--into dequantized is for QLoRA adapters; {adapter} is {method or 'a LoRA adapter'}"
        )
    spec = base_spec([art], base)
    out = Path(out)
    with _claimed(out) as tmp:
        loaded = load_base(art, spec, weights=_merge_base(into))
        model = attach_adapter(loaded.model, art, spec)
        tokenizer = loaded.tokenizer
        unmerged = [_batch_logits(model, tokenizer, texts)[0] for texts in check_texts]
        merged = model.merge_and_unload()
        with writing(out):  # into the temp dir beside `out`, which a failure removes
            merged.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        del merged, model
        written = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        worst, tokens = 0.0, 0
        for texts, ref_logits in zip(check_texts, unmerged, strict=True):
            logits, mask = _batch_logits(written, tokenizer, texts)
            worst = max(worst, (logits - ref_logits).abs()[mask].max().item())
            tokens += int(mask.sum())
        del written
        worst64 = None
        if not worst < tolerance:
            # fp32 matmuls in a different order (W0 x + B A x vs (W0 + B A) x) drift by ~1e-4 over 30
            # layers; computing both sides in fp64 separates that noise from a wrong merge
            worst64 = _fp64_merge_diff(spec, art, tmp, check_texts, into)
        if not (worst < tolerance or (worst64 is not None and worst64 < tolerance)):
            raise UserError(
                f"merged model differs from base + adapter by {worst:.3g} max abs logit in fp32"
                + (f", {worst64:.3g} in fp64" if worst64 is not None else "")
                + f" (tolerance {tolerance:g}): nothing written"
            )
        report = MergeReport(
            out=str(out),
            base=spec,
            adapter=str(art.path),
            method=method,
            into=into or "full",
            dtype="float32",
            max_abs_diff=worst,
            max_abs_diff_fp64=worst64,
            tolerance=tolerance,
            tokens_checked=tokens,
        )
        _publish(tmp, out, "adaptlab_merge.json", report)
    return report


# ----------------------------------------------------------------------------------------------
# held-out text and NLL


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts from a JSONL file (`text` field) or a .txt file (paragraphs split on blank lines)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: no such file (expected a .jsonl file with a `text` field or a .txt file)")
    texts: list[str] = []
    if p.suffix == ".jsonl":
        with p.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{p}:{lineno}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{p}:{lineno}: no string `text` field (found: {fields})")
                if record["text"].strip():
                    texts.append(record["text"])
                if limit is not None and len(texts) >= limit:
                    break
    elif p.suffix == ".txt":
        texts = [t.strip() for t in re.split(r"\n\s*\n", p.read_text()) if t.strip()]
        texts = texts[:limit] if limit is not None else texts
    else:
        raise UserError(f"{p}: expected a .jsonl file (with a `text` field) or a .txt file")
    if not texts:
        raise UserError(f"{p}: no non-empty texts")
    return texts


def mean_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 256
) -> float:
    """Mean NLL per token (nats) over `texts`, scored as `adaptlab eval` scores them (windows of max_length)."""
    from adaptlab.evaluate.perplexity import score_documents, summarize

    scores = score_documents(model, tokenizer, list(texts), seq_len=max_length, batch_size=batch_size)
    return float(summarize(scores)["nll"])


# ----------------------------------------------------------------------------------------------
# combine


@dataclass
class CombineReport:
    """The combined adapter and the NLL per token of each model on each evaluation text set."""

    out: str
    base: str
    how: str
    weights: list[float]
    density: float | None
    adapters: dict[str, str]  # name -> adapter dir
    datasets: list[str]  # evaluation set names, in column order
    nll: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> dataset -> NLL per token
    domain_of: dict[str, str] = field(default_factory=dict)  # adapter name -> its own domain's dataset

    def interference(self) -> dict[str, float]:
        """Per domain: combined NLL minus its own adapter's NLL (positive = the combination lost ground)."""
        return {
            ds: self.nll["combined"][ds] - self.nll[name][ds]
            for name, ds in self.domain_of.items()
            if "combined" in self.nll
        }


def _adapter_names(refs: Sequence[Artifact]) -> list[str]:
    names: list[str] = []
    for ref in refs:
        stem = (ref.run_dir or ref.path).name
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem) or "adapter"
        if name in ("base", "combined", "default"):
            name = f"{name}_adapter"
        candidate, i = name, 2
        while candidate in names:
            candidate, i = f"{name}_{i}", i + 1
        names.append(candidate)
    return names


def _fix_combined_scaling(model: Any, name: str) -> None:
    """Give the combined adapter scaling 1, as add_weighted_adapter intends.

    add_weighted_adapter folds each source's scaling into the new A/B matrices and sets
    lora_alpha = r so the new scaling is 1, but it copies `use_rslora` from the first source; for
    rsLoRA sources the new scaling would then be alpha / sqrt(r) = sqrt(r), not 1.
    """
    from peft.tuners.lora import LoraLayer

    config = model.peft_config[name]
    if not getattr(config, "use_rslora", False):
        return
    config.use_rslora = False
    config.lora_alpha = config.r
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.scaling:
            module.scaling[name] = 1.0


def combine_adapters(
    adapters: Sequence[str | Path],
    out: str | Path,
    base: str | None = None,
    *,
    weights: Sequence[float] | None = None,
    how: Combination = "linear",
    density: float | None = None,
    data: Sequence[str | Path] = (),
    general: str | Path | None = None,
    max_texts: int = 64,
    max_length: int = 256,
    batch_size: int = 8,
) -> CombineReport:
    """Combine adapters with peft's add_weighted_adapter, save the result to `out`, and measure it.

    weights default to 1/n each. `data[i]` is read as the held-out text of `adapters[i]`'s domain
    when as many files as adapters are given; `general` is the general probe. Every model (base,
    each adapter, the combination) is scored on every text set.
    """
    weights, density = _check_combination(len(adapters), how, weights, density)
    refs = [resolve_adapter(a, "it has nothing to combine; use it directly with --model") for a in adapters]
    spec = base_spec(refs, base)
    datasets = {Path(p).stem: read_texts(p, max_texts) for p in data}
    if len(datasets) != len(data):
        raise UserError("--data files need distinct names (they label the result columns)")
    if general is not None:
        datasets["general"] = read_texts(general, max_texts)
    out = Path(out)
    with _claimed(out) as tmp:
        loaded = load_model(spec, dtype=torch.float32)
        names = _adapter_names(refs)
        model = _combined_model(loaded.model, names, refs, spec, weights, how, density)
        with writing(out):  # into the temp dir beside `out`, which a failure removes
            _save_combined(model, tmp, spec)
        report = CombineReport(
            out=str(out),
            base=spec,
            how=how,
            weights=weights,
            density=density,
            adapters={n: str(r.path) for n, r in zip(names, refs, strict=True)},
            datasets=list(datasets),
        )
        if len(data) == len(refs):
            report.domain_of = {n: Path(p).stem for n, p in zip(names, data, strict=True)}
        if datasets:
            report.nll = _nll_table(model, loaded.tokenizer, names, datasets, batch_size, max_length)
        _publish(tmp, out, "adaptlab_combine.json", report)
    return report


def _check_combination(
    n: int, how: str, weights: Sequence[float] | None, density: float | None
) -> tuple[list[float], float | None]:
    """The weights (1/n each by default) and the ties density (DEFAULT_TIES_DENSITY by default) of a
    combination of n adapters, checked: at least two adapters, a known --how, one finite weight per
    adapter, --density for ties only and in (0, 1]."""
    if n < 2:
        raise UserError("combine needs at least two --adapter values")
    if how not in COMBINATIONS:
        raise UserError(f"--how {how!r}: choose one of {', '.join(COMBINATIONS)}")
    weights = list(weights) if weights is not None else [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"--weights has {len(weights)} values for {n} adapters: give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        given = ",".join(f"{w:g}" for w in weights)
        raise UserError(f"--weights {given}: every weight must be a finite number (no nan or inf)")
    if density is not None and how != "ties":
        raise UserError("--density applies to --how ties only")
    if how == "ties":
        density = DEFAULT_TIES_DENSITY if density is None else density
        if not 0.0 < density <= 1.0:
            raise UserError(f"--density {density}: must be in (0, 1]")
    return weights, density


def _combined_model(
    base: Any,
    names: list[str],
    refs: Sequence[Artifact],
    spec: str,
    weights: list[float],
    how: str,
    density: float | None,
) -> Any:
    """The base with every source adapter attached under its name and their combination added as
    "combined" (scaling 1), in eval mode. A DoRA adapter, or adapters peft cannot combine this way,
    are refused."""
    model = base
    for name, ref in zip(names, refs, strict=True):
        model = attach_adapter(model, ref, spec, name)
        if getattr(model.peft_config[name], "use_dora", False):
            raise UserError(
                f"{ref.path} is a DoRA adapter: combine takes LoRA adapters (peft cannot combine DoRA)"
            )
    try:
        model.add_weighted_adapter(
            adapters=names,
            weights=weights,
            adapter_name="combined",
            combination_type=how,
            density=density,
        )
    except ValueError as err:
        raise UserError(f"peft cannot combine these adapters with --how {how}: {err}") from err
    _fix_combined_scaling(model, "combined")
    model.eval()
    return model


def _save_combined(model: Any, tmp: Path, spec: str) -> None:
    """Write the "combined" adapter alone into `tmp` as a PEFT adapter directory whose config names `spec`
    as its base."""
    with warnings.catch_warnings():  # peft looks for the base's config under the embedded name
        warnings.filterwarnings("ignore", message="Could not find a config file")
        warnings.filterwarnings("ignore", message="Unable to fetch remote file")  # offline: the same
        model.save_pretrained(tmp, selected_adapters=["combined"], safe_serialization=True)
    # peft writes a non-default adapter into a subfolder named after it; the output is the adapter
    for item in (tmp / "combined").iterdir():
        os.replace(item, tmp / item.name)
    (tmp / "combined").rmdir()
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = spec
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def _nll_table(
    model: Any,
    tokenizer: Any,
    names: list[str],
    datasets: dict[str, list[str]],
    batch_size: int,
    max_length: int,
) -> dict[str, dict[str, float]]:
    """NLL per token of the base (adapters off), each source adapter and the combination on every text set:
    model -> dataset -> NLL."""
    nll: dict[str, dict[str, float]] = {}
    with model.disable_adapter():
        nll["base"] = {
            ds: mean_nll(model, tokenizer, t, batch_size, max_length) for ds, t in datasets.items()
        }
    for name in [*names, "combined"]:
        model.set_adapter(name)
        nll[name] = {ds: mean_nll(model, tokenizer, t, batch_size, max_length) for ds, t in datasets.items()}
    return nll
