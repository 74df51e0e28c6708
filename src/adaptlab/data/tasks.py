"""Verifiable tasks: prompts with an `answer` a reward can check (rewards.py), for GRPO and task accuracy.

A task source is one of:
  - `arithmetic`: embedded, needs no download. Every sum a + b of two-digit numbers (10..99), asked
    as "What is a + b? Answer with the number only." with answer str(a + b); 8,100 items.
  - a JSONL file, one object per line with string fields `prompt` and `answer` (optional `id`).

Items split train/test by a stable hash of their id (corpus.split_fraction), so the held-out prompts
never change between runs and never appear in training. With under 3 items nothing is held out.

The embedded task is sized for smollm2-135m (chat template, greedy): it mostly starts to work the
sum out in words ("To solve this, we need to add ..."), so how many answers are right depends on the
completion length: 10% of 150 random sums within 12 new tokens (measured on a 2-core CPU). That
leaves a reward room to rise, in the answer and in its format (answering at once fits the budget).

    python -c "from adaptlab.data.tasks import load_task; print(load_task('arithmetic')[:2])"
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from adaptlab.data.corpus import split_fraction, start_token
from adaptlab.data.sources import EMBEDDED_TASKS, read_jsonl
from adaptlab.errors import UserError

TEST_FRAC = 0.1
"""Fraction of a task's items held out for evaluation."""
TaskSplit = Literal["train", "test", "all"]
ARITHMETIC_RANGE = range(10, 100)
ARITHMETIC_PROMPT = "What is {a} + {b}? Answer with the number only."


@dataclass(frozen=True)
class TaskItem:
    """One verifiable prompt: the user message and the answer a reward checks a completion against."""

    id: str
    prompt: str
    answer: str


def arithmetic_items() -> list[TaskItem]:
    """Every two-digit sum, in a fixed order."""
    return [
        TaskItem(id=f"arithmetic:{a}+{b}", prompt=ARITHMETIC_PROMPT.format(a=a, b=b), answer=str(a + b))
        for a in ARITHMETIC_RANGE
        for b in ARITHMETIC_RANGE
    ]


def _record_to_item(record: Any, where: str, default_id: str) -> TaskItem:
    if not isinstance(record, dict):
        raise UserError(
            f"{where}: expected a JSON object with `prompt` and `answer`, got {type(record).__name__}"
        )
    missing = [k for k in ("prompt", "answer") if k not in record]
    if missing:
        keys = ", ".join(sorted(record)) or "none"
        raise UserError(
            f"{where}: no field {missing[0]!r} (fields: {keys}); a task row needs prompt and answer"
        )
    prompt, answer = record["prompt"], record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise UserError(f"{where}: `answer` must be a string or a number, got {type(answer).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: `prompt` must be a non-empty string")
    return TaskItem(id=str(record.get("id", default_id)), prompt=prompt, answer=str(answer))


def _file_items(path: Path) -> list[TaskItem]:
    if path.suffix != ".jsonl":
        raise UserError(f"task {path}: expected a .jsonl file with `prompt` and `answer` per line")
    name = "/".join(path.parts[-2:])
    items = [_record_to_item(rec, f"{path}:{n}", f"{name}:{n}") for n, rec in read_jsonl(path)]
    if not items:
        raise UserError(f"task {path}: no rows")
    return items


def load_task(source: str) -> list[TaskItem]:
    """Every item of an embedded task name or a JSONL file, in a stable order."""
    if source == "arithmetic":
        return arithmetic_items()
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(
            f"task {source!r}: not an embedded task ({', '.join(EMBEDDED_TASKS)}) or a JSONL file "
            "with `prompt` and `answer` per line"
        )
    return _file_items(path)


def split_items(items: list[TaskItem], split: TaskSplit, test_frac: float = TEST_FRAC) -> list[TaskItem]:
    """The items of one split: test when the id's hash position is below test_frac, train otherwise.

    From 3 items on, test holds at least one (the lowest hash) and train at least one; under 3,
    every item trains and test is empty.
    """
    if split == "all":
        return list(items)
    if split not in ("train", "test"):
        raise UserError(f"unknown task split {split!r}; choose train, test or all")
    u = {it.id: split_fraction(it.id) for it in items}
    if len(items) < 3:
        test_ids: set[str] = set()
    else:
        ranked = sorted(items, key=lambda it: (u[it.id], it.id))
        n_test = min(max(sum(1 for it in items if u[it.id] < test_frac), 1), len(items) - 1)
        test_ids = {it.id for it in ranked[:n_test]}
    return [it for it in items if (it.id in test_ids) == (split == "test")]


def render_prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    """A prompt as token ids: the chat template's user turn with the generation prompt, or the start
    token + the text."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [start_token(tokenizer), *tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]]
