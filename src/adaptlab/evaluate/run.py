"""`evaluate()`: every figure of a model, each next to its base's figure and the paired difference.

The comparison tool calls this directly; `adaptlab eval` parses flags, loads models and data and
calls it. The base of a PeftModel is the same object inside `disable_adapter()` (no second copy);
a full fine-tuned model gets its base passed as `base_model`. Base figures are cached on disk
(cache.py) when `base_identity` is given.

Returned JSON (each section present only when asked for; "base" and "delta" only when a base is
compared; nll in nats per token, bpb in bits per UTF-8 byte, ci95 = paired bootstrap 95% interval
over documents/items, N_RESAMPLES resamples, seed 0):

    {
      "target":  {"nll": f, "ppl": f, "bpb": f, "tokens": n, "docs": n,
                  "base": {"nll", "ppl", "bpb", "tokens", "docs"},
                  "delta": {"nll": tuned - base, "ci95": [lo, hi]}},
      "general": {same as target},
      "drift":   {"kl": f, "tokens": n, "docs": n, "ci95": [lo, hi], "source": "sampled" | "data"},
      "mc":      {"<file stem>": {"acc": f, "acc_norm": f, "n": n,
                                  "base": {"acc", "acc_norm", "n"},
                                  "delta": {"acc": f, "ci95": [lo, hi], "acc_norm": f, "acc_norm_ci95": [lo, hi]}}},
      "harness": {"<task>": {"<metric>": f, ..., "base": {...}, "delta": {"<metric>": f}}},
      "settings": {"seq_len", "stride", "batch_size", "drift_new_tokens", "seed", "n_resamples"}
    }

learning = -target.delta.nll; forgetting = general.delta.nll, drift.kl, -mc.<general task>.delta.acc.

    python -c "from adaptlab.evaluate import evaluate; from adaptlab.models import load_model as l; \\
m = l('tiny-random'); print(evaluate(m.model, m.tokenizer, target_docs=['Some held-out text.']))"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.data.sources import Document
from adaptlab.errors import UserError
from adaptlab.evaluate import choice, drift, harness, perplexity, stats
from adaptlab.evaluate.cache import BaseCache, hash_texts
from adaptlab.evaluate.prompts import GENERAL_PROMPTS

Progress = Callable[[str, int], None]  # (stage, tokens just processed; 0 when a stage starts)


def _check_same_vocab(model: Any, base: Any, tokenizer: Any, base_tokenizer: Any) -> None:
    rows = [m.get_output_embeddings().weight.shape[0] for m in (model, base)]
    if rows[0] != rows[1] or (
        base_tokenizer is not tokenizer and tokenizer.get_vocab() != base_tokenizer.get_vocab()
    ):
        raise UserError(
            "the tuned model and the base have different vocabularies: pass the base it was fine-tuned from with --model"
        )


def _nll_section(
    tuned: perplexity.DocScores, base: perplexity.DocScores | None, n_resamples: int
) -> dict[str, Any]:
    section: dict[str, Any] = perplexity.summarize(tuned)
    if base is not None:
        section["base"] = perplexity.summarize(base)
        ci = stats.paired_delta_ci(tuned.nll, tuned.tokens, base.nll, base.tokens, n_resamples)
        section["delta"] = {"nll": section["nll"] - section["base"]["nll"], "ci95": ci}
    return section


def _mc_section(
    tuned: choice.ChoiceScores, base: choice.ChoiceScores | None, n_resamples: int
) -> dict[str, Any]:
    section: dict[str, Any] = choice.summarize(tuned)
    if base is not None:
        section["base"] = choice.summarize(base)
        ones = np.ones(len(tuned.acc))
        section["delta"] = {
            "acc": section["acc"] - section["base"]["acc"],
            "ci95": stats.paired_delta_ci(tuned.acc, ones, base.acc, ones, n_resamples),
            "acc_norm": section["acc_norm"] - section["base"]["acc_norm"],
            "acc_norm_ci95": stats.paired_delta_ci(tuned.acc_norm, ones, base.acc_norm, ones, n_resamples),
        }
    return section


def _stems(files: Sequence[str | Path]) -> list[str]:
    stems: list[str] = []
    for f in files:
        stem = Path(f).stem
        stems.append(stem if stem not in stems else f"{stem}_{len(stems)}")
    return stems


def evaluate(
    model: Any,
    tokenizer: Any,
    base_model: Any | None = None,
    *,
    base_tokenizer: Any | None = None,
    compare: bool = True,
    target_docs: Sequence[str | Document] | None = None,
    general_docs: Sequence[str | Document] | None = None,
    drift_kl: bool = False,
    drift_docs: Sequence[str | Document] | None = None,
    drift_prompts: Sequence[str] = GENERAL_PROMPTS,
    mc_files: Sequence[str | Path] | None = None,
    mc_limit: int | None = None,
    harness_tasks: Sequence[str] | None = None,
    harness_include: str | Path | None = None,
    harness_limit: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    stride: int | None = None,
    drift_new_tokens: int = drift.NEW_TOKENS,
    seed: int = 0,
    n_resamples: int = stats.N_RESAMPLES,
    cache: BaseCache | None = None,
    base_identity: str | None = None,
    model_identity: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """All asked-for figures of `model` (see the module docstring for the schema).

    base_model: a separately loaded base (full fine-tuning). Without it, a PeftModel is compared
    with itself inside disable_adapter(); a plain model is reported alone. compare=False reports
    the model alone in any case. drift_kl: measure drift, over drift_docs when given, else over
    text sampled from the base from drift_prompts. base_identity / model_identity (cache.model_identity): cache the
    figures of the base / of the model under that identity in `cache` (a default BaseCache when None).
    """
    if batch_size < 1 or seq_len < 8:
        raise UserError(f"need --batch >= 1 and --seq-len >= 8 (got {batch_size}, {seq_len})")
    if stride is not None and not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq-len {seq_len} (got {stride})")
    peft_base = compare and base_model is None and drift.is_peft(model)
    has_base = compare and (base_model is not None or peft_base)
    base_tok = base_tokenizer or tokenizer
    if base_model is not None and compare:
        _check_same_vocab(model, base_model, tokenizer, base_tok)
    if drift_kl and not has_base:
        raise UserError("--drift compares a tuned model with its base: pass --adapter or --tuned")
    if cache is None and (base_identity or model_identity):
        cache = BaseCache()
    settings = {
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "batch_size": batch_size,
        "drift_new_tokens": drift_new_tokens,
        "seed": seed,
        "n_resamples": n_resamples,
    }
    say: Progress = progress or (lambda stage, n: None)

    def cached(
        identity: str | None, kind: str, data_hash: str, key_settings: dict[str, Any], compute: Any
    ) -> Any:
        if cache is None or identity is None:
            return compute()
        key = cache.key(identity, kind, data_hash, key_settings)
        hit = cache.get(key)
        if hit is not None:
            return hit
        value = compute()
        cache.put(key, value)
        return value

    def run_base(fn: Callable[[Any, Any], Any]) -> Any:
        if peft_base:
            with drift.as_base(model):
                return fn(model, base_tok)
        return fn(base_model, base_tok)

    nll_settings = {"seq_len": seq_len, "stride": stride or seq_len, "conventions": "start-token-v1"}

    def nll_figures(name: str, docs: Sequence[str | Document]) -> dict[str, Any]:
        docs = perplexity.as_documents(docs)
        if not docs:
            raise UserError(f"no {name} documents to evaluate")
        data_hash = hash_texts(list(docs))

        def score(m: Any, tok: Any) -> Any:
            return perplexity.score_documents(
                m, tok, docs, seq_len, batch_size, stride, progress=lambda n: say(name, n)
            ).to_json()

        say(name, 0)
        tuned = perplexity.DocScores.from_json(
            cached(model_identity, "nll", data_hash, nll_settings, lambda: score(model, tokenizer))
        )
        base = None
        if has_base:
            say(f"{name} (base)", 0)
            base = perplexity.DocScores.from_json(
                cached(base_identity, "nll", data_hash, nll_settings, lambda: run_base(score))
            )
        return _nll_section(tuned, base, n_resamples)

    result: dict[str, Any] = {}
    if target_docs is not None:
        result["target"] = nll_figures("target", target_docs)
    if general_docs is not None:
        result["general"] = nll_figures("general", general_docs)
    if drift_kl:
        if drift_docs is not None:
            docs = perplexity.as_documents(drift_docs)
            if not docs:
                raise UserError("no drift documents to evaluate")
            seqs, masks, _ = perplexity.encode_documents(docs, base_tok, seq_len)
            source = "data"
        else:
            say("drift (sampling from base)", 0)
            sample_settings = {"new_tokens": drift_new_tokens, "seed": seed, "batch": drift.SAMPLE_BATCH}
            samples = cached(
                base_identity,
                "drift-samples",
                hash_texts(list(drift_prompts)),
                sample_settings,
                lambda: run_base(
                    lambda m, tok: list(drift.sample_from_base(m, tok, drift_prompts, drift_new_tokens, seed))
                ),
            )
            seqs, masks = samples[0], samples[1]
            source = "sampled"
        say("drift", 0)
        scores = drift.drift_scores(
            model,
            tokenizer,
            seqs,
            masks,
            base=None if peft_base else base_model,
            seq_len=seq_len,
            batch_size=batch_size,
            stride=stride,
            progress=lambda n: say("drift", n),
        )
        total = int(scores.tokens.sum())
        result["drift"] = {
            "kl": float(scores.kl.sum() / total) if total else float("nan"),
            "tokens": total,
            "docs": len(seqs),
            "ci95": stats.ratio_ci(scores.kl, scores.tokens, n_resamples),
            "source": source,
        }
    if mc_files:
        result["mc"] = {}
        mc_settings = {"seq_len": seq_len, "scoring": "lm-eval-0.4-loglikelihood"}
        for stem, path in zip(_stems(mc_files), mc_files, strict=True):
            items = choice.load_items(path, mc_limit)
            data_hash = hash_texts(items)

            def score_mc(m: Any, tok: Any, items: list[choice.Item] = items, stem: str = stem) -> Any:
                return choice.score_items(
                    m, tok, items, seq_len, batch_size, lambda n: say(stem, n)
                ).to_json()

            say(f"mc {stem}", 0)
            tuned_mc = choice.ChoiceScores.from_json(
                cached(
                    model_identity,
                    "mc",
                    data_hash,
                    mc_settings,
                    lambda score_mc=score_mc: score_mc(model, tokenizer),
                )
            )
            base_mc = None
            if has_base:
                say(f"mc {stem} (base)", 0)
                base_mc = choice.ChoiceScores.from_json(
                    cached(
                        base_identity,
                        "mc",
                        data_hash,
                        mc_settings,
                        lambda score_mc=score_mc: run_base(score_mc),
                    )
                )
            result["mc"][stem] = _mc_section(tuned_mc, base_mc, n_resamples)
    if harness_tasks:
        tasks = list(harness_tasks)

        def run_h(m: Any, tok: Any) -> dict[str, dict[str, float]]:
            return harness.run_tasks(m, tok, tasks, harness_include, batch_size, harness_limit)

        say("harness", 0)
        tuned_h = run_h(model, tokenizer)
        base_h = run_base(run_h) if has_base else None
        section: dict[str, Any] = {}
        for task, metrics in tuned_h.items():
            section[task] = dict(metrics)
            if base_h is not None and task in base_h:
                section[task]["base"] = base_h[task]
                section[task]["delta"] = {
                    k: v - base_h[task][k]
                    for k, v in metrics.items()
                    if "stderr" not in k and k in base_h[task] and math.isfinite(v)
                }
        result["harness"] = section
    result["settings"] = settings
    return result
