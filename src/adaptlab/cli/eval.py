"""`adaptlab eval`: learning and forgetting of a tuned model against its base, or a base model alone.

    adaptlab eval --model smollm2-135m --adapter RUN --data DOCS --drift --mc ITEMS.jsonl
    adaptlab eval --adapter RUN --task arithmetic --drift     # task accuracy next to drift

`--drift` takes an optional value: `--drift` alone measures KL(base || tuned) on text sampled from
the base from the shipped general prompts; `--drift G` measures it over the documents of G. The
JSON (`--json`, or `--out FILE`) is adaptlab.evaluate.run's schema plus "model" (the base spec)
and "tuned" ({"kind", "path", "description"}) when a tuned artifact is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def _delta(value: float, ci: list[float] | None) -> str:
    text = f"{value:+.4f}"
    return f"{text} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else text


def _rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, base, tuned, delta) rows for the table."""
    rows: list[tuple[str, str, str, str]] = []
    for section in ("target", "general"):
        s = result.get(section)
        if not s:
            continue
        base = s.get("base", {})
        for key in ("nll", "ppl", "bpb", "tokens", "docs"):
            delta = _delta(s["delta"]["nll"], s["delta"]["ci95"]) if key == "nll" and "delta" in s else ""
            rows.append((f"{section} {key}", _fmt(base.get(key)), _fmt(s[key]), delta))
    if "drift" in result:
        d = result["drift"]
        ci = d["ci95"]
        rows.append((f"drift kl ({d['source']})", "0", _fmt(d["kl"]), f"[{ci[0]:.4f}, {ci[1]:.4f}]"))
        rows.append(("drift tokens", "", _fmt(d["tokens"]), ""))
    for stem, s in result.get("mc", {}).items():
        base, delta = s.get("base", {}), s.get("delta")
        rows.append(
            (
                f"mc {stem} acc",
                _fmt(base.get("acc")),
                _fmt(s["acc"]),
                _delta(delta["acc"], delta["ci95"]) if delta else "",
            )
        )
        rows.append(
            (
                f"mc {stem} acc_norm",
                _fmt(base.get("acc_norm")),
                _fmt(s["acc_norm"]),
                _delta(delta["acc_norm"], delta["acc_norm_ci95"]) if delta else "",
            )
        )
        rows.append((f"mc {stem} n", "", _fmt(s["n"]), ""))
    if "task" in result:
        rows.extend(_task_rows(result["task"]))
    for task, s in result.get("harness", {}).items():
        base, delta = s.get("base", {}), s.get("delta", {})
        for key, value in s.items():
            if key in ("base", "delta"):
                continue
            rows.append(
                (
                    f"{task} {key}",
                    _fmt(base.get(key)),
                    _fmt(value),
                    _delta(delta[key], None) if key in delta else "",
                )
            )
    return rows


def _task_rows(t: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    base, delta = t.get("base", {}), t.get("delta")
    name = f"task {t['name']}"
    return [
        (
            f"{name} pass@1",
            _fmt(base.get("pass1")),
            _fmt(t["pass1"]),
            _delta(delta["pass1"], delta["pass1_ci95"]) if delta else "",
        ),
        (
            f"{name} mean reward@{t['k']}",
            _fmt(base.get("mean_reward_k")),
            _fmt(t["mean_reward_k"]),
            _delta(delta["mean_reward_k"], delta["mean_reward_k_ci95"]) if delta else "",
        ),
        (f"{name} n", "", _fmt(t["n"]), ""),
    ]


def _print_table(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    compared = any(isinstance(s, dict) and "base" in s for s in result.values()) or "drift" in result
    table = Table(title=title)
    table.add_column("figure")
    if compared:
        table.add_column("base", justify="right")
        table.add_column("tuned", justify="right")
        table.add_column("delta [95% CI]", justify="right")
    else:
        table.add_column("value", justify="right")
    for figure, base, tuned, delta in _rows(result):
        table.add_row(figure, base, tuned, delta) if compared else table.add_row(figure, tuned)
    Console().print(table)


@click.command("eval")
@click.option(
    "--model",
    "model_spec",
    help="Base model: embedded name, local HF dir or hub id (default: the base the tuned artifact records).",
)
@click.option(
    "--adapter", type=click.Path(), help="Tuned artifact: run dir, PEFT adapter dir or HF model dir."
)
@click.option("--tuned", type=click.Path(), help="Same as --adapter (either kind of tuned artifact).")
@click.option(
    "--data", multiple=True, help="Held-out target text (file, dir, glob, python-stdlib); repeatable."
)
@click.option(
    "--split",
    type=click.Choice(["test", "val", "train", "all"]),
    default="test",
    show_default=True,
    help="Which split of --data to score.",
)
@click.option("--general", multiple=True, help="General-domain text: same figures as --data, every document.")
@click.option(
    "--drift",
    "drift_data",
    is_flag=False,
    flag_value="",
    default=None,
    help="Drift KL(base || tuned); alone: over text sampled from the base; --drift G: over the documents of G.",
)
@click.option(
    "--drift-tokens",
    type=int,
    default=64,
    show_default=True,
    help="Tokens sampled per general prompt for --drift.",
)
@click.option(
    "--mc",
    multiple=True,
    type=click.Path(),
    help="Multiple-choice JSONL {question, choices, answer}; repeatable.",
)
@click.option(
    "--harness", "harness_tasks", help="lm-eval task names, comma-separated (needs adaptlab[harness])."
)
@click.option("--harness-include", type=click.Path(), help="Directory of local lm-eval task YAMLs.")
@click.option("--harness-limit", type=int, help="At most this many examples per lm-eval task.")
@click.option(
    "--task",
    "task_source",
    help="Verifiable task: arithmetic (embedded) or a JSONL of prompt/answer rows; scores its held-out prompts.",
)
@click.option(
    "--task-reward",
    default="exact",
    show_default=True,
    help="Reward for --task: exact | regex:PATTERN | python:module:function.",
)
@click.option(
    "--task-k", type=int, default=4, show_default=True, help="Samples per prompt for the mean reward."
)
@click.option("--seq-len", type=int, default=512, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=int, help="Tokens scored per window (default --seq-len: no overlap).")
@click.option("--batch", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option(
    "--max-docs",
    type=int,
    help="Use only the first N documents of each text source and N items of each --mc file.",
)
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--no-cache", is_flag=True, help="Recompute base figures instead of reading the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print all figures as JSON.")
@click.option("--out", type=click.Path(), help="Write all figures as JSON to this file.")
@click.option("--overwrite", is_flag=True, help="Replace --out even if adaptlab did not write it.")
def eval_command(
    model_spec: str | None,
    adapter: str | None,
    tuned: str | None,
    data: tuple[str, ...],
    split: str,
    general: tuple[str, ...],
    drift_data: str | None,
    drift_tokens: int,
    mc: tuple[str, ...],
    harness_tasks: str | None,
    harness_include: str | None,
    harness_limit: int | None,
    task_source: str | None,
    task_reward: str,
    task_k: int,
    seq_len: int,
    stride: int | None,
    batch: int,
    max_docs: int | None,
    text_field: str,
    no_cache: bool,
    as_json: bool,
    out: str | None,
    overwrite: bool,
) -> None:
    """Perplexity, bits per byte, drift, multiple choice and task accuracy of a model, tuned against its base."""
    from rich.console import Console

    from adaptlab.data.sources import check_names

    check_names(model_spec, [*data, *general])  # before torch is imported: a wrong name fails at once
    from adaptlab.errors import UserError
    from adaptlab.evaluate import evaluate
    from adaptlab.evaluate.cache import BaseCache

    _check_flag_combinations(adapter, tuned)
    tasks = [t.strip() for t in harness_tasks.split(",") if t.strip()] if harness_tasks else []
    if not (data or general or drift_data is not None or mc or tasks or task_source):
        raise UserError("nothing to evaluate: pass --data, --general, --drift, --mc, --harness or --task")
    task_eval = _task_eval(task_source, task_reward, task_k, max_docs) if task_source else None
    if out:
        from adaptlab.outputs import check_file_out

        check_file_out(Path(out), ("model", "settings"), overwrite)
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs must be at least 1 (got {max_docs})")
    err = Console(stderr=True)
    ref, spec = _tuned_and_base(model_spec, adapter or tuned, err)
    target_docs, general_docs, drift_docs = _documents(data, split, general, drift_data, text_field, max_docs)

    with err.status(f"loading {ref.path if ref else spec}"):
        model, tokenizer, kwargs = _models(spec, ref)
    _check_window(model, seq_len, spec)
    if no_cache:
        kwargs.pop("base_identity", None)
        kwargs.pop("model_identity", None)
    with err.status("evaluating") as status:
        result = evaluate(
            model,
            tokenizer,
            target_docs=target_docs,
            general_docs=general_docs,
            drift_kl=drift_data is not None,
            drift_docs=drift_docs,
            drift_new_tokens=drift_tokens,
            mc_files=list(mc) or None,
            mc_limit=max_docs,
            harness_tasks=tasks or None,
            harness_include=harness_include,
            harness_limit=harness_limit,
            task=task_eval,
            seq_len=seq_len,
            batch_size=batch,
            stride=stride,
            cache=BaseCache(),
            progress=_progress(status),
            **kwargs,
        )
    _emit(result, spec, ref, out, as_json, err)


def _check_flag_combinations(adapter: str | None, tuned: str | None) -> None:
    """Refuse --adapter with --tuned, and a flag that shapes another flag's evaluation without that flag."""
    from adaptlab.errors import UserError

    if adapter and tuned:
        raise UserError(
            "Can't provide both --adapter and --tuned. Choose one (both accept any tuned artifact)."
        )
    _check_dependent_flags(click.get_current_context())


def _tuned_and_base(model_spec: str | None, artifact: str | None, err: Any) -> tuple[Any, str]:
    """The tuned artifact resolved (None without one) and the base model's spec: --model, else the
    base the artifact records."""
    from adaptlab.artifacts import resolve
    from adaptlab.errors import UserError

    ref = resolve(artifact) if artifact else None
    spec = model_spec or (ref.base_model if ref else None)
    if not spec:
        raise UserError("pass --model (the base model; the tuned artifact does not record one)")
    if ref:
        err.print(f"tuned: {ref.describe()}; base: {spec}")
    return ref, spec


def _check_window(model: Any, seq_len: int, spec: str) -> None:
    """Refuse a --seq-len longer than the model's position table (max_position_embeddings)."""
    from adaptlab.config import check_seq_len

    check_seq_len(seq_len, getattr(getattr(model, "config", None), "max_position_embeddings", None), spec)


def _task_eval(task_source: str, task_reward: str, task_k: int, max_docs: int | None) -> Any:
    """The --task evaluation (an evaluate.run.TaskEval); a bad task, reward or --task-k fails here,
    before the model loads."""
    from adaptlab.data.rewards import load_reward
    from adaptlab.data.tasks import load_task
    from adaptlab.errors import UserError
    from adaptlab.evaluate.run import TaskEval

    load_task(task_source)
    load_reward(task_reward)
    if task_k < 1:
        raise UserError(f"--task-k must be at least 1 (got {task_k})")
    return TaskEval(task_source, task_reward, task_k, limit=max_docs)


def _documents(
    data: tuple[str, ...],
    split: str,
    general: tuple[str, ...],
    drift_data: str | None,
    text_field: str,
    max_docs: int | None,
) -> tuple[list[Any] | None, list[Any] | None, list[Any] | None]:
    """The target (its --split), general and drift documents, each cut to --max-docs; None where not asked."""
    from adaptlab.data.corpus import split_documents
    from adaptlab.data.sources import load_documents
    from adaptlab.errors import UserError

    def first(docs: list[Any]) -> list[Any]:
        return docs[:max_docs] if max_docs else docs

    target_docs = None
    if data:
        target_docs = first(split_documents(load_documents(list(data), text_field), split))  # type: ignore[arg-type]
        if not target_docs:
            raise UserError(f"the {split} split of --data is empty: add documents or pass --split all")
    general_docs = first(load_documents(list(general), text_field)) if general else None
    drift_docs = first(load_documents(drift_data, text_field)) if drift_data else None
    return target_docs, general_docs, drift_docs


def _progress(status: Any) -> Callable[[str, int], None]:
    """A progress callback for evaluate() that shows the tokens scored so far in the current stage."""
    seen = {"stage": "", "tokens": 0}

    def progress(stage: str, n: int) -> None:
        if stage != seen["stage"]:
            seen.update(stage=stage, tokens=0)
        seen["tokens"] += n
        status.update(f"{stage}: {seen['tokens']:,} tokens")

    return progress


def _emit(result: dict[str, Any], spec: str, ref: Any, out: str | None, as_json: bool, err: Any) -> None:
    """The figures with the base spec ("model") and the tuned artifact ("tuned"), as JSON to --out and/or
    stdout (--json), or as a table when --json is not given."""
    import json

    result = {"model": spec, **result}
    if ref:
        result["tuned"] = {"kind": ref.kind, "path": str(ref.path), "description": ref.describe()}
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        err.print(f"wrote {out}")
    if as_json and not out:
        click.echo(text)
    elif not as_json:
        _print_table(result, f"{spec} + {ref.path}" if ref else spec)


def _models(spec: str, ref: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The model to evaluate, its tokenizer, and evaluate()'s base and identity arguments.

    A tuned artifact is loaded as trained (artifacts.load_tuned: a QLoRA adapter on the NF4 base),
    and compared with the full-precision base, as `adaptlab compare` does: a LoRA adapter's base is
    the same model with its adapter disabled; a full model or a QLoRA adapter gets the base loaded
    beside it.
    """
    from adaptlab.artifacts import load_tuned
    from adaptlab.evaluate.cache import model_identity
    from adaptlab.models import load_model

    if ref is None:
        base = load_model(spec)
        return base.model, base.tokenizer, {"model_identity": model_identity(spec, base.path, base.model)}
    tuned, ref = load_tuned(ref, spec)
    if ref.kind == "adapter" and not ref.trained_on_4bit:
        base_id = model_identity(spec, tuned.path, tuned.model.get_base_model())
        tuned_id = base_id + "|adapter=" + model_identity(str(ref.path), ref.path)
        return tuned.model, tuned.tokenizer, {"model_identity": tuned_id, "base_identity": base_id}
    base = load_model(spec)
    kwargs = {
        "base_model": base.model,
        "base_tokenizer": base.tokenizer,
        "base_identity": model_identity(spec, base.path, base.model),
        "model_identity": model_identity(str(ref.path), ref.path, tuned.model),
    }
    if ref.kind == "adapter":  # the 4-bit base differs from `spec`: name both in the cache key
        kwargs["model_identity"] = kwargs["base_identity"] + "|qlora=" + kwargs["model_identity"]
    return tuned.model, tuned.tokenizer, kwargs


DEPENDS_ON = {
    "task_reward": ("--task-reward", "task_source", "--task"),
    "task_k": ("--task-k", "task_source", "--task"),
    "harness_include": ("--harness-include", "harness_tasks", "--harness"),
    "harness_limit": ("--harness-limit", "harness_tasks", "--harness"),
    "drift_tokens": ("--drift-tokens", "drift_data", "--drift"),
}
"""Flags that only shape another flag's evaluation: given without it they are refused, not ignored."""


def _check_dependent_flags(ctx: click.Context) -> None:
    from click.core import ParameterSource

    from adaptlab.errors import UserError

    for name, (flag, parent, parent_flag) in DEPENDS_ON.items():
        given = ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
        if given and ctx.params.get(parent) in (None, ()):
            raise UserError(f"{flag} applies to {parent_flag}: add {parent_flag} or drop {flag}")
