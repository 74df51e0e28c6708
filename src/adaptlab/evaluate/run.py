"""`evaluate()`: every figure of a model, each next to its base's figure and the paired difference.

The comparison tool calls this directly; `adaptlab eval` parses flags, loads models and data and
calls it. The base of a PeftModel is the same object inside `disable_adapter()` (no second copy);
a full fine-tuned model gets its base passed as `base_model`. Base figures are cached on disk
(cache.py) when `base_identity` is given.

Returned JSON (each section present only when asked for; "base" and "delta" only when a base is
compared; nll in nats per token, bpb in bits per UTF-8 byte; ci95 = a 95% interval over
documents/items: of a difference from the base, the paired jackknife t interval of
stats.paired_delta_ci; of one figure, a bootstrap of N_RESAMPLES resamples, seed 0):

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
      "task":    {"name", "reward", "n", "k", "pass1", "mean_reward_k", "base": {...},
                  "delta": {"pass1", "pass1_ci95", "mean_reward_k", "mean_reward_k_ci95"}}  (evaluate/task.py)
      "target_kl": {"base_tuned": f, "tuned_base": f, "ci95_base_tuned", "ci95_tuned_base", "tokens", "docs"},
      "settings": {"seq_len", "stride", "batch_size", "drift_new_tokens", "seed", "n_resamples"}
    }

With per_doc=True every section also keeps its per-document (per-item) numbers, the inputs of paired
comparisons between models scored on the same documents: target/general "per_doc": {"nll", "base_nll",
"tokens"}; drift and target_kl "per_doc": {"kl", "kl_reverse"?, "tokens"}; mc "per_item": {"acc", "base_acc"}.
target_kl (KL both ways on the held-out target text) is measured when asked for with target_kl=True.

learning = -target.delta.nll; forgetting = general.delta.nll, drift.kl, -mc.<general task>.delta.acc.

    python -c "from adaptlab.evaluate import evaluate; from adaptlab.models import load_model as l; \\
m = l('tiny-random'); print(evaluate(m.model, m.tokenizer, target_docs=['Some held-out text.']))"
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    tuned: perplexity.DocScores, base: perplexity.DocScores | None, per_doc: bool = False
) -> dict[str, Any]:
    section: dict[str, Any] = perplexity.summarize(tuned)
    if base is not None:
        section["base"] = perplexity.summarize(base)
        ci = stats.paired_delta_ci(tuned.nll, tuned.tokens, base.nll, base.tokens)
        section["delta"] = {"nll": section["nll"] - section["base"]["nll"], "ci95": ci}
    if per_doc:
        section["per_doc"] = {"nll": tuned.nll.tolist(), "tokens": tuned.tokens.tolist()}
        if base is not None:
            section["per_doc"]["base_nll"] = base.nll.tolist()
    return section


def _mc_section(
    tuned: choice.ChoiceScores, base: choice.ChoiceScores | None, per_doc: bool = False
) -> dict[str, Any]:
    section: dict[str, Any] = choice.summarize(tuned)
    if per_doc:
        section["per_item"] = {"acc": np.asarray(tuned.acc, float).tolist()}
        if base is not None:
            section["per_item"]["base_acc"] = np.asarray(base.acc, float).tolist()
    if base is not None:
        section["base"] = choice.summarize(base)
        section["delta"] = stats.item_deltas(
            [
                ("acc", "ci95", tuned.acc, base.acc),
                ("acc_norm", "acc_norm_ci95", tuned.acc_norm, base.acc_norm),
            ]
        )
    return section


def _stems(files: Sequence[str | Path]) -> list[str]:
    stems: list[str] = []
    for f in files:
        stem = Path(f).stem
        stems.append(stem if stem not in stems else f"{stem}_{len(stems)}")
    return stems


@dataclass
class _Scoring:
    """What every step of an evaluation shares: the model, its base, the cache and the settings."""

    model: Any
    tokenizer: Any
    base_model: Any | None
    base_tok: Any
    peft_base: bool  # the base is the PeftModel itself, inside disable_adapter()
    has_base: bool
    cache: BaseCache | None
    base_identity: str | None
    model_identity: str | None
    seq_len: int
    batch_size: int
    stride: int | None
    n_resamples: int
    say: Progress
    per_doc: bool = False

    def cached(
        self, identity: str | None, kind: str, data_hash: str, key_settings: dict[str, Any], compute: Any
    ) -> Any:
        """compute(), or its value cached under (identity, kind, data, settings) when an identity is given."""
        if self.cache is None or identity is None:
            return compute()
        key = self.cache.key(identity, kind, data_hash, key_settings)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        value = compute()
        self.cache.put(key, value)
        return value

    def run_base(self, fn: Callable[[Any, Any], Any]) -> Any:
        """fn(base model, base tokenizer): the PeftModel with its adapter disabled, or the separate base."""
        if self.peft_base:
            with drift.as_base(self.model):
                return fn(self.model, self.base_tok)
        return fn(self.base_model, self.base_tok)

    def tuned_and_base(
        self,
        stage: str,
        kind: str,
        data_hash: str,
        key_settings: dict[str, Any],
        score: Callable[[Any, Any], Any],
        parse: Callable[[Any], Any],
    ) -> tuple[Any, Any | None]:
        """parse(score(model, tokenizer)) of the model and, when compared, of its base; each score (JSON)
        through the cache."""
        self.say(stage, 0)
        tuned = self.cached(
            self.model_identity, kind, data_hash, key_settings, lambda: score(self.model, self.tokenizer)
        )
        if not self.has_base:
            return parse(tuned), None
        self.say(f"{stage} (base)", 0)
        base = self.cached(self.base_identity, kind, data_hash, key_settings, lambda: self.run_base(score))
        return parse(tuned), parse(base)


def _nll_step(s: _Scoring, name: str, docs_in: Sequence[str | Document]) -> dict[str, Any]:
    """Per-token NLL of the model (and its base) on documents, with the paired difference."""
    docs = perplexity.as_documents(docs_in)
    if not docs:
        raise UserError(f"no {name} documents to evaluate")
    data_hash = hash_texts(list(docs))
    key_settings = {"seq_len": s.seq_len, "stride": s.stride or s.seq_len, "conventions": "start-token-v1"}

    def score(m: Any, tok: Any) -> Any:
        return perplexity.score_documents(
            m, tok, docs, s.seq_len, s.batch_size, s.stride, progress=lambda n: s.say(name, n)
        ).to_json()

    parse = perplexity.DocScores.from_json
    tuned, base = s.tuned_and_base(name, "nll", data_hash, key_settings, score, parse)
    return _nll_section(tuned, base, s.per_doc)


def _drift_texts(
    s: _Scoring,
    drift_docs: Sequence[str | Document] | None,
    prompts: Sequence[str],
    new_tokens: int,
    seed: int,
) -> tuple[Any, Any, str]:
    """(token sequences, masks, source) that drift is measured over: given documents or base samples."""
    if drift_docs is not None:
        docs = perplexity.as_documents(drift_docs)
        if not docs:
            raise UserError("no drift documents to evaluate")
        seqs, masks, _ = perplexity.encode_documents(docs, s.base_tok, s.seq_len)
        return seqs, masks, "data"
    s.say("drift (sampling from base)", 0)
    sample_settings = {"new_tokens": new_tokens, "seed": seed, "batch": drift.SAMPLE_BATCH}
    samples = s.cached(
        s.base_identity,
        "drift-samples",
        hash_texts(list(prompts)),
        sample_settings,
        lambda: s.run_base(lambda m, tok: list(drift.sample_from_base(m, tok, prompts, new_tokens, seed))),
    )
    return samples[0], samples[1], "sampled"


def _drift_step(s: _Scoring, seqs: Any, masks: Any, source: str) -> dict[str, Any]:
    """Mean per-token KL(base || tuned) over the sequences, with its bootstrap interval."""
    scores = _kl_scores(s, seqs, masks, "drift", reverse=False)
    total = int(scores.tokens.sum())
    out = {
        "kl": float(scores.kl.sum() / total) if total else float("nan"),
        "tokens": total,
        "docs": len(seqs),
        "ci95": stats.ratio_ci(scores.kl, scores.tokens, s.n_resamples),
        "source": source,
    }
    if s.per_doc:
        out["per_doc"] = {"kl": scores.kl.tolist(), "tokens": scores.tokens.tolist()}
    return out


def _target_kl_step(s: _Scoring, docs_in: Sequence[str | Document]) -> dict[str, Any]:
    """KL(base || tuned) and KL(tuned || base) per token on the held-out target text."""
    seqs, masks, _ = perplexity.encode_documents(perplexity.as_documents(docs_in), s.base_tok, s.seq_len)
    scores = _kl_scores(s, seqs, masks, "target KL", reverse=True)
    assert scores.kl_reverse is not None
    total = int(scores.tokens.sum())
    out: dict[str, Any] = {
        "base_tuned": float(scores.kl.sum() / total) if total else float("nan"),
        "tuned_base": float(scores.kl_reverse.sum() / total) if total else float("nan"),
        "ci95_base_tuned": stats.ratio_ci(scores.kl, scores.tokens, s.n_resamples),
        "ci95_tuned_base": stats.ratio_ci(scores.kl_reverse, scores.tokens, s.n_resamples),
        "tokens": total,
        "docs": len(seqs),
    }
    if s.per_doc:
        out["per_doc"] = {
            "kl": scores.kl.tolist(),
            "kl_reverse": scores.kl_reverse.tolist(),
            "tokens": scores.tokens.tolist(),
        }
    return out


def _kl_scores(s: _Scoring, seqs: Any, masks: Any, stage: str, reverse: bool) -> drift.DriftScores:
    s.say(stage, 0)
    return drift.drift_scores(
        s.model,
        s.tokenizer,
        seqs,
        masks,
        base=None if s.peft_base else s.base_model,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        stride=s.stride,
        progress=lambda n: s.say(stage, n),
        reverse=reverse,
    )


def _mc_step(s: _Scoring, stem: str, path: str | Path, limit: int | None) -> dict[str, Any]:
    """Multiple-choice accuracy of the model (and its base) on one file, with the paired difference."""
    items = choice.load_items(path, limit)
    data_hash = hash_texts(items)
    key_settings = {"seq_len": s.seq_len, "scoring": "lm-eval-0.4-loglikelihood"}

    def score(m: Any, tok: Any) -> Any:
        return choice.score_items(m, tok, items, s.seq_len, s.batch_size, lambda n: s.say(stem, n)).to_json()

    parse = choice.ChoiceScores.from_json
    tuned, base = s.tuned_and_base(f"mc {stem}", "mc", data_hash, key_settings, score, parse)
    return _mc_section(tuned, base, s.per_doc)


def _harness_step(
    s: _Scoring, tasks: list[str], include: str | Path | None, limit: int | None
) -> dict[str, Any]:
    """lm-eval tasks on the model (and its base); deltas for every finite, non-stderr metric."""

    def run_h(m: Any, tok: Any) -> dict[str, dict[str, float]]:
        return harness.run_tasks(m, tok, tasks, include, s.batch_size, limit)

    s.say("harness", 0)
    tuned = run_h(s.model, s.tokenizer)
    base = s.run_base(run_h) if s.has_base else None
    section: dict[str, Any] = {}
    for task, metrics in tuned.items():
        section[task] = dict(metrics)
        if base is not None and task in base:
            section[task]["base"] = base[task]
            section[task]["delta"] = {
                k: v - base[task][k]
                for k, v in metrics.items()
                if "stderr" not in k and k in base[task] and math.isfinite(v)
            }
    return section


@dataclass
class TaskEval:
    """A verifiable task to score on its held-out prompts (evaluate/task.py)."""

    source: str
    """arithmetic or a JSONL file of prompt/answer rows."""
    reward: str = "exact"
    k: int = 4
    """Samples per prompt for the mean reward."""
    limit: int | None = None
    """At most this many held-out prompts."""
    max_new_tokens: int = 32


def _task_step(s: _Scoring, spec: TaskEval, seed: int) -> dict[str, Any]:
    """pass@1 and mean reward over k samples of the model (and its base), with paired differences."""
    from dataclasses import replace

    from adaptlab.evaluate import task

    items = task.task_items(spec.source, spec.limit)
    key_settings = {"reward": spec.reward, "k": spec.k, "new_tokens": spec.max_new_tokens, "seed": seed}
    if spec.reward.startswith("python:"):  # the user's function may change under the same name
        s = replace(s, cache=None)

    def score(m: Any, tok: Any) -> Any:
        return task.score_task(
            m, tok, items, spec.reward, spec.k, spec.max_new_tokens, s.batch_size * spec.k, seed
        ).to_json()

    parse = task.TaskScores.from_json
    tuned, base = s.tuned_and_base(
        f"task {spec.source}", "task", hash_texts(items), key_settings, score, parse
    )
    section = task.task_section(tuned, base)
    return {"name": spec.source, "reward": spec.reward, **section}


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
    task: TaskEval | None = None,
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
    per_doc: bool = False,
    target_kl: bool = False,
) -> dict[str, Any]:
    """All asked-for figures of `model` (see the module docstring for the schema).

    base_model: a separately loaded base (full fine-tuning). Without it, a PeftModel is compared
    with itself inside disable_adapter(); a plain model is reported alone. compare=False reports
    the model alone in any case. drift_kl: measure drift, over drift_docs when given, else over
    text sampled from the base from drift_prompts. base_identity / model_identity (cache.model_identity): cache the
    figures of the base / of the model under that identity in `cache` (a default BaseCache when None).
    task: a verifiable task (TaskEval) scored on its held-out prompts, pass@1 and mean reward@k.
    per_doc: keep the per-document numbers in each section; target_kl: KL both ways on target_docs.
    """
    s = _scoring(
        model,
        tokenizer,
        base_model,
        base_tokenizer,
        compare=compare,
        drift_kl=drift_kl,
        seq_len=seq_len,
        batch_size=batch_size,
        stride=stride,
        n_resamples=n_resamples,
        cache=cache,
        base_identity=base_identity,
        model_identity=model_identity,
        progress=progress,
        per_doc=per_doc,
    )
    result: dict[str, Any] = {}
    if target_docs is not None:
        result["target"] = _nll_step(s, "target", target_docs)
    if general_docs is not None:
        result["general"] = _nll_step(s, "general", general_docs)
    if target_kl and target_docs is not None and s.has_base:
        result["target_kl"] = _target_kl_step(s, target_docs)
    if drift_kl:
        result["drift"] = _drift_step(s, *_drift_texts(s, drift_docs, drift_prompts, drift_new_tokens, seed))
    if mc_files:
        result["mc"] = _mc_sections(s, mc_files, mc_limit)
    if harness_tasks:
        result["harness"] = _harness_step(s, list(harness_tasks), harness_include, harness_limit)
    if task is not None:
        result["task"] = _task_step(s, task, seed)
    result["settings"] = _settings(seq_len, stride, batch_size, drift_new_tokens, seed, n_resamples)
    return result


def _scoring(
    model: Any,
    tokenizer: Any,
    base_model: Any | None,
    base_tokenizer: Any | None,
    *,
    compare: bool,
    drift_kl: bool,
    seq_len: int,
    batch_size: int,
    stride: int | None,
    n_resamples: int,
    cache: BaseCache | None,
    base_identity: str | None,
    model_identity: str | None,
    progress: Progress | None,
    per_doc: bool,
) -> _Scoring:
    """evaluate()'s scoring state: which base the model is compared with (a separate base_model, the
    PeftModel itself with its adapter off, or none) and the cache, after the checks that refuse bad
    window settings, a base with another vocabulary, and drift without a base."""
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
    return _Scoring(
        model=model,
        tokenizer=tokenizer,
        base_model=base_model,
        base_tok=base_tok,
        peft_base=peft_base,
        has_base=has_base,
        cache=cache,
        base_identity=base_identity,
        model_identity=model_identity,
        seq_len=seq_len,
        batch_size=batch_size,
        stride=stride,
        n_resamples=n_resamples,
        say=progress or (lambda stage, n: None),
        per_doc=per_doc,
    )


def _mc_sections(s: _Scoring, mc_files: Sequence[str | Path], limit: int | None) -> dict[str, Any]:
    """The "mc" section: each multiple-choice file's figures under its stem."""
    return {
        stem: _mc_step(s, stem, path, limit) for stem, path in zip(_stems(mc_files), mc_files, strict=True)
    }


def _settings(
    seq_len: int, stride: int | None, batch_size: int, drift_new_tokens: int, seed: int, n_resamples: int
) -> dict[str, Any]:
    """The "settings" section: the scoring settings every figure was computed with."""
    return {
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "batch_size": batch_size,
        "drift_new_tokens": drift_new_tokens,
        "seed": seed,
        "n_resamples": n_resamples,
    }
