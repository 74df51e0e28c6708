"""Verifiable rewards: a completion scored against a task item's `answer`, for GRPO and task accuracy.

A reward spec is one of:
  - `exact`: 1.0 when the completion's answer equals `answer`, else 0.0. A numeric answer is
    compared with the last number in the completion (commas and a trailing ".0" ignored); any
    other answer with the completion's stripped, case-folded text (trailing '.' dropped).
  - `regex:PATTERN`: the first group of PATTERN's first match in the completion, normalised as
    above, compared with `answer`. A pattern that is empty or has no group is refused.
  - `python:module:function`: the user's own, called as function(prompt=..., completion=...,
    answer=...) and returning a number (bool counts as 0/1). The module is imported from the
    current directory or sys.path. Import errors, exceptions, a sys.exit (SystemExit) and
    non-number returns become one line naming the function.

    python -c "from adaptlab.data.rewards import load_reward; print(load_reward('exact')('p', 'It is 42.', '42'))"
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from adaptlab.errors import UserError

Reward = Callable[[str, str, str], float]
"""reward(prompt, completion, answer) -> a finite float."""
REWARD_KINDS = "exact, regex:PATTERN or python:module:function"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalise(text: str) -> str:
    """Stripped, case-folded text without a trailing full stop."""
    return text.strip().casefold().rstrip(".").strip()


def extract_answer(completion: str, answer: str) -> str | None:
    """What `exact` compares with `answer`: the last number for a numeric answer, else the whole text."""
    if _as_number(answer.strip()) is None:
        return normalise(completion)
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def same_answer(found: str | None, answer: str) -> bool:
    """Numbers compare by value; other text after normalise()."""
    if found is None:
        return False
    want, got = _as_number(answer.strip()), _as_number(found.strip())
    if want is not None:
        return got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=1e-9)
    return normalise(found) == normalise(answer)


def exact_reward(prompt: str, completion: str, answer: str) -> float:
    return float(same_answer(extract_answer(completion, answer), answer))


def regex_reward(pattern: str) -> Reward:
    if not pattern:
        raise UserError(
            r"reward regex: has an empty pattern: give one with a group, e.g. 'regex:answer: (\d+)'"
        )
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise UserError(f"reward regex:{pattern}: not a valid regular expression ({err})") from err
    if not compiled.groups:
        raise UserError(
            f"reward regex:{pattern}: the pattern has no group; the reward compares its first group with the "
            r"answer: put the answer in parentheses, e.g. 'regex:answer: (\d+)'"
        )

    def reward(prompt: str, completion: str, answer: str) -> float:
        m = compiled.search(completion)
        if m is None:
            return 0.0
        return float(same_answer(m.group(1), answer))

    return reward


def python_reward(spec: str) -> Reward:
    """The user's function named by `module:function`, wrapped so failures are one line naming it."""
    module_name, sep, func_name = spec.partition(":")
    name = f"python:{spec}"
    if not sep or not module_name or not func_name:
        raise UserError(f"reward {name}: write python:module:function (e.g. python:my_rewards:score)")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:
        raise UserError(f"reward {name}: importing {module_name!r} {_exited(err)}") from err
    except Exception as err:  # noqa: BLE001 - any import failure of the user's module is one line
        raise UserError(
            f"reward {name}: cannot import {module_name!r} ({type(err).__name__}: {err})"
        ) from err
    finally:
        if added:
            sys.path.remove(cwd)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"reward {name}: module {module_name!r} has no function {func_name!r}")

    def reward(prompt: str, completion: str, answer: str) -> float:
        try:
            value = func(prompt=prompt, completion=completion, answer=answer)
        except SystemExit as err:  # a reward ends nothing: the run stops here with its checkpoints kept
            raise UserError(f"reward {name} {_exited(err)}") from err
        except Exception as err:  # noqa: BLE001 - the user's code: one line naming it
            raise UserError(f"reward {name} raised {type(err).__name__}: {err}") from err
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise UserError(
                f"reward {name} returned {value!r:.40} ({type(value).__name__}); it must return a finite number"
            )
        return float(value)

    return reward


def _exited(err: SystemExit) -> str:
    return (
        f"called sys.exit({err.code!r}) (raised SystemExit); a reward must return a number, "
        "not end the process"
    )


def load_reward(spec: str) -> Reward:
    """The reward a spec names (see the module docstring); UserError for an unknown or broken spec."""
    if spec == "exact":
        return exact_reward
    if spec.startswith("regex:"):
        return regex_reward(spec.removeprefix("regex:"))
    if spec.startswith("python:"):
        return python_reward(spec.removeprefix("python:"))
    raise UserError(f"unknown reward {spec!r}: use {REWARD_KINDS}")
