"""Verifiable tasks and rewards: the embedded arithmetic task, JSONL tasks, exact/regex/python rewards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from adaptlab.data.rewards import exact_reward, load_reward
from adaptlab.data.tasks import arithmetic_items, load_task, split_items
from adaptlab.errors import UserError


def test_arithmetic_task_is_fixed_and_its_splits_are_disjoint() -> None:
    items = load_task("arithmetic")
    assert len(items) == 90 * 90
    assert items == arithmetic_items()
    first = items[0]
    assert first.prompt == "What is 10 + 10? Answer with the number only." and first.answer == "20"
    train, test = split_items(items, "train"), split_items(items, "test")
    assert {i.id for i in train}.isdisjoint({i.id for i in test})
    assert len(train) + len(test) == len(items)
    assert 0.05 < len(test) / len(items) < 0.15
    assert split_items(items, "test") == test  # deterministic


def test_tiny_tasks_hold_out_nothing_under_three_rows_and_one_from_three() -> None:
    items = load_task("arithmetic")
    assert split_items(items[:2], "test") == [] and len(split_items(items[:2], "train")) == 2
    assert len(split_items(items[:3], "test")) == 1 and len(split_items(items[:3], "train")) == 2


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_task_rows_and_their_errors_name_file_and_line(tmp_path: Path) -> None:
    good = _write(
        tmp_path / "t.jsonl",
        [{"prompt": "2+2?", "answer": 4}, {"prompt": "Capital of France?", "answer": "Paris"}],
    )
    items = load_task(str(good))
    assert [(i.prompt, i.answer) for i in items] == [("2+2?", "4"), ("Capital of France?", "Paris")]
    missing = _write(tmp_path / "m.jsonl", [{"prompt": "a", "answer": "b"}, {"prompt": "no answer"}])
    with pytest.raises(UserError, match=r"m\.jsonl:2: no field 'answer'"):
        load_task(str(missing))
    broken = _write(tmp_path / "b.jsonl", [{"prompt": "a", "answer": "b"}, "{not json"])
    with pytest.raises(UserError, match=r"b\.jsonl:2: malformed JSON"):
        load_task(str(broken))
    with pytest.raises(UserError, match="not an embedded task"):
        load_task(str(tmp_path / "absent.jsonl"))


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("68", "68", 1.0),
        ("The answer is 68.", "68", 1.0),
        ("45 + 23 = 68", "68", 1.0),  # the last number
        ("68 or maybe 69", "68", 0.0),
        ("1,024", "1024", 1.0),
        ("68.0", "68", 1.0),
        ("sixty-eight", "68", 0.0),
        ("", "68", 0.0),
        ("  Paris. ", "paris", 1.0),
        ("Paris, France", "Paris", 0.0),
    ],
)
def test_exact_reward(completion: str, answer: str, reward: float) -> None:
    assert exact_reward("p", completion, answer) == reward
    assert load_reward("exact")("p", completion, answer) == reward


def test_regex_reward_takes_the_first_group() -> None:
    r = load_reward(r"regex:answer: (\d+)")
    assert r("p", "thinking 12... answer: 68", "68") == 1.0
    assert r("p", "answer: 67", "68") == 0.0
    assert r("p", "68", "68") == 0.0  # no match
    with pytest.raises(UserError, match="not a valid regular expression"):
        load_reward("regex:(")


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_rewards_mod.py").write_text(
        "def score(prompt, completion, answer):\n    return float(completion.strip() == answer)\n"
        "def boom(prompt, completion, answer):\n    raise ValueError('bad row')\n"
        "def text(prompt, completion, answer):\n    return 'yes'\n"
    )
    monkeypatch.chdir(tmp_path)
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_python_reward_calls_the_users_function(user_module: str) -> None:
    r = load_reward(f"python:{user_module}:score")
    assert r("p", " 7 ", "7") == 1.0 and r("p", "8", "7") == 0.0


def test_python_reward_failures_are_one_line_naming_the_function(user_module: str) -> None:
    with pytest.raises(UserError, match=r"python:my_rewards_mod:boom raised ValueError: bad row"):
        load_reward(f"python:{user_module}:boom")("p", "c", "a")
    with pytest.raises(UserError, match=r"python:my_rewards_mod:text returned 'yes' \(str\).*number"):
        load_reward(f"python:{user_module}:text")("p", "c", "a")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_reward(f"python:{user_module}:nope")
    with pytest.raises(UserError, match="cannot import 'no_such_module_xyz'"):
        load_reward("python:no_such_module_xyz:f")
    with pytest.raises(UserError, match="unknown reward"):
        load_reward("fuzzy")


@pytest.mark.parametrize(
    ("spec", "words"),
    [("regex:", "empty pattern"), (r"regex:answer: \d+", "has no group"), ("regex:(?:x)", "has no group")],
)
def test_a_regex_reward_without_a_pattern_or_group_is_refused(spec: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        load_reward(spec)


def test_a_reward_module_that_exits_on_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(UserError, match=r"importing 'exits_on_import' called sys.exit\(0\)"):
            load_reward("python:exits_on_import:f")
    finally:
        sys.modules.pop("exits_on_import", None)
