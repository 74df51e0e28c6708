"""A failed file or system call (full disk, read-only place, a file where a directory belongs) is one
line naming the path and the system's reason, exit 2: main() maps OSError; real failures, no mocks.

We may run as root, which chmod does not stop; these paths fail for root too: /dev/full (every write
is ENOSPC), /sys (mkdir is refused), and a path that goes through a regular file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture()
def corpus(tmp_path) -> Path:
    words = ["permission", "is", "hereby", "granted", "to", "any", "person", "obtaining", "a", "copy"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(words * 6)}) + "\n" for _ in range(8)))
    return path


def _eval_to(run_cli, corpus: Path, out: Path | str, *extra: str) -> tuple[int, str]:
    code, _, err = run_cli("eval", "--model", "tiny-random", "--data", corpus, "--seq-len", 16,
                           "--max-docs", 4, "--no-cache", "--out", out, *extra)  # fmt: skip
    return code, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_is_one_line_exit_2(run_cli, corpus):
    code, err = _eval_to(run_cli, corpus, "/dev/full")  # a device is never read as an earlier output
    assert code == 2 and "not a regular file" in _one_line(err)
    code, err = _eval_to(run_cli, corpus, "/dev/full", "--overwrite")
    assert code == 2 and "No space left on device" in _one_line(err) and "disk is full" in err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs")
def test_unwritable_place_is_one_line_exit_2(run_cli, corpus):
    code, err = _eval_to(run_cli, corpus, "/sys/adaptlab-out/eval.json")
    line = _one_line(err)
    assert code == 2 and "/sys/adaptlab-out" in line, line
    assert "Operation not permitted" in line or "Permission denied" in line or "Read-only" in line, line


def test_out_through_a_file_is_one_line_exit_2(run_cli, corpus, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    code, err = _eval_to(run_cli, corpus, blocker / "eval.json")
    assert code == 2 and str(blocker) in _one_line(err)
    code, _, err = run_cli("train", "--model", "tiny-random", "--data", corpus, "--steps", 1, "--seq-len", 16,
                           "--batch", 1, "--quiet", "--out", blocker / "run")  # fmt: skip
    assert code == 2 and str(blocker) in _one_line(err)
    assert blocker.read_text() == "mine"
