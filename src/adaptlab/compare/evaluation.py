"""What every arm of a comparison is measured on (the probes, loaded once), and the measuring of one
run: its learning and forgetting (`evaluate_run`, cached in RUN/eval.json under the probes' key) and
its weight-update analysis (`analyze_run`, cached in RUN/analysis.json).

    python -c "from adaptlab.compare.evaluation import evaluate_run; help(evaluate_run)"
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptlab.compare.child import OnEvent
from adaptlab.compare.spec import CompareSpec
from adaptlab.errors import UserError
from adaptlab.rundir import RunDir, atomic_write


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _cut(docs: list[Any], max_docs: int, max_chars: int | None) -> list[Any]:
    from adaptlab.data.sources import Document

    out = []
    for d in docs[:max_docs]:
        if max_chars is not None and not d.is_chat and len(d.text) > max_chars:
            d = Document(id=d.id, text=d.text[:max_chars])
        out.append(d)
    return out


@dataclass
class Probes:
    """What every arm is measured on, loaded once per invocation."""

    target: list[Any]
    general: list[Any] | None
    drift_docs: list[Any] | None
    drift_prompts: list[str]
    key: dict[str, Any]


def load_probes(spec: CompareSpec) -> Probes:
    from adaptlab.data.corpus import split_documents
    from adaptlab.data.sources import load_documents
    from adaptlab.evaluate.cache import hash_texts
    from adaptlab.evaluate.prompts import GENERAL_PROMPTS

    e = spec.eval
    docs = load_documents(spec.data.train, spec.data.text_field)
    test = split_documents(docs, "test", spec.data.val_frac, spec.data.test_frac)
    if not test:
        raise UserError(
            "the target data has no held-out test documents: add documents or raise data.test_frac"
        )
    target = _cut(test, e.max_docs, e.max_chars)
    general = _cut(load_documents(spec.general), e.max_docs, e.max_chars) if spec.general else None
    drift_docs = (
        _cut(load_documents(spec.drift_data), e.max_docs, e.max_chars)
        if spec.drift and spec.drift_data
        else None
    )
    prompts = list(GENERAL_PROMPTS)
    if e.drift_prompts is not None and e.drift_prompts < len(prompts):
        step = len(prompts) / e.drift_prompts  # evenly spread over the prompts' topics
        prompts = [prompts[int(i * step)] for i in range(e.drift_prompts)]
    key = {
        "model": spec.model,
        "target": hash_texts(target),
        "general": hash_texts(general) if general else None,
        "drift": spec.drift,
        "drift_data": hash_texts(drift_docs) if drift_docs else None,
        "drift_prompts": hash_texts(prompts) if spec.drift and not drift_docs else None,
        "drift_tokens": e.drift_tokens,
        "mc": [str(Path(f).resolve()) for f in spec.mc],
        "mc_limit": e.mc_limit,
        "seq_len": e.seq_len,
        "per_doc": 1,  # per-document numbers and the target KL are kept (paired differences, predictor)
    }
    if not e.target_kl:
        key["target_kl"] = False
    return Probes(target, general, drift_docs, prompts, key)


def evaluate_run(
    spec: CompareSpec, run_dir: Path, probes: Probes, on_event: OnEvent, name: str = "eval.json"
) -> dict[str, Any]:
    """Learning and forgetting of one run (cached in RUN/<name> under the probes' key)."""
    path = run_dir / name
    summary_mtime = (run_dir / "summary.json").stat().st_mtime_ns
    method = RunDir(run_dir).read_summary().get("method")
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            cached = json.loads(path.read_text())
            fresh = cached.get("key") == probes.key and cached.get("summary_mtime_ns") == summary_mtime
            if fresh and ("quantized_base" in cached or method != "qlora"):
                return cached
    from adaptlab.artifacts import load_tuned
    from adaptlab.evaluate import evaluate
    from adaptlab.evaluate.cache import BaseCache, model_identity
    from adaptlab.models import load_model

    e = spec.eval
    tuned, ref = load_tuned(run_dir, spec.model)
    model, tokenizer = tuned.model, tuned.tokenizer
    base = None
    if ref.kind == "model" or method == "qlora":
        # full fine-tuning, or an adapter on the 4-bit base: compare with the same full-precision base
        # every arm is compared with (a LoRA adapter's base is the same model with adapters disabled)
        base = load_model(spec.model)
    kwargs: dict[str, Any] = {}
    if base is not None:
        kwargs.update(base_model=base.model, base_tokenizer=base.tokenizer)
        kwargs["base_identity"] = model_identity(spec.model, base.path, base.model)
    else:
        kwargs["base_identity"] = model_identity(spec.model, tuned.path, tuned.model.get_base_model())
    seen: dict[str, Any] = {"stage": None, "tokens": 0, "t": 0.0}

    def progress(stage: str, n: int) -> None:
        if stage != seen["stage"]:
            seen.update(stage=stage, tokens=0)
        seen["tokens"] += n
        now = time.perf_counter()
        if n == 0 or now - seen["t"] > 5:
            seen["t"] = now
            on_event(
                {"event": "eval_progress", "run": run_dir.name, "stage": stage, "tokens": seen["tokens"]}
            )

    kwargs.update(
        target_docs=probes.target,
        general_docs=probes.general,
        seq_len=e.seq_len,
        batch_size=e.batch,
        cache=BaseCache(),
        progress=progress,
    )
    result = evaluate(
        model,
        tokenizer,
        drift_kl=spec.drift,
        drift_docs=probes.drift_docs,
        drift_prompts=probes.drift_prompts,
        drift_new_tokens=e.drift_tokens,
        mc_files=spec.mc or None,
        mc_limit=e.mc_limit,
        per_doc=True,
        target_kl=e.target_kl,
        **kwargs,
    )
    if method == "qlora" and (probes.target or probes.general):
        # the same NLL figures for the 4-bit base alone (adapter off): how much of the arm's learning
        # and forgetting is the quantization of the base rather than the adapter
        with model.disable_adapter():
            result["quantized_base"] = evaluate(model, tokenizer, **kwargs)
    result = {"key": probes.key, "summary_mtime_ns": summary_mtime, **result}
    write_json(path, result)
    del model, tuned, base, kwargs
    gc.collect()
    return result


def analyze_run(spec: CompareSpec, run_dir: Path) -> dict[str, Any]:
    """The weight-update analysis of one run (cached: RUN/analysis.json with its heatmaps)."""
    path = run_dir / "analysis.json"
    k, eps = spec.analysis.k, spec.analysis.eps
    if path.exists() and path.stat().st_mtime_ns >= (run_dir / "summary.json").stat().st_mtime_ns:
        with contextlib.suppress(json.JSONDecodeError, OSError):
            cached = json.loads(path.read_text())
            if cached.get("k") == k and cached.get("eps") == eps:
                return cached
    from adaptlab.analysis import analyze

    result = analyze(spec.model, run_dir, k=k, eps=eps, out_dir=run_dir)
    gc.collect()
    return result
