"""Bridge to lm-evaluation-harness (optional extra `adaptlab[harness]`): its tasks on our model object.

The model already in memory is wrapped with `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=tokenizer)`, so a PeftModel is evaluated as is, and its base inside
`disable_adapter()` without a second copy. Tasks are lm-eval task names, or local task YAMLs in
`include_path`; `write_mc_task` writes such a YAML for a JSONL file of `{question, choices,
answer}` items (the format `--mc` reads), which runs offline.

Returned figures: {task: {metric: value}} with lm-eval's "acc,none" keys flattened to "acc"
(stderr as "acc_stderr").

    python -c "from adaptlab.evaluate.harness import write_mc_task; print(write_mc_task('items.jsonl', '/tmp/t'))"
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from adaptlab.errors import UserError

MC_TASK_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def available() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise UserError(
            "--harness needs lm-evaluation-harness: pip install 'adaptlab[harness]' (or pip install lm-eval)"
        )


def write_mc_task(jsonl: str | Path, out_dir: str | Path, name: str | None = None) -> str:
    """Write an lm-eval task YAML for a `{question, choices, answer}` JSONL file; returns the task name."""
    jsonl = Path(jsonl).expanduser().resolve()
    name = name or "adaptlab_" + re.sub(r"[^A-Za-z0-9_]", "_", jsonl.stem)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.yaml").write_text(MC_TASK_TEMPLATE.format(name=name, path=jsonl))
    return name


def _flatten(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "alias" or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
    return out


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on the model object in memory; {task: {metric: value}}."""
    require()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--harness-include {include_path}: no such directory of task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: check the name (`lm_eval ls tasks`) "
            "or pass a directory of task YAMLs with --harness-include"
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False, verbosity="ERROR"
        )
    except (ConnectionError, OSError) as err:
        raise UserError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({type(err).__name__}; offline?): "
            "use a local task YAML with --harness-include"
        ) from err
    if results is None:  # only non-zero ranks get None
        return {}
    return {task: _flatten(metrics) for task, metrics in results["results"].items()}
