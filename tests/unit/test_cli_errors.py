"""A failed file or system call (full disk, read-only place, a file where a directory belongs) is one
line naming the path and the system's reason, exit 2: main() maps OSError; real failures, no mocks.

We may run as root, which chmod does not stop; these paths fail for root too: /dev/full (every write
is ENOSPC), /sys (mkdir is refused), and a path that goes through a regular file.

A disk that fills in the middle of train, merge or export has no such path: there the lowest-level
writes (Python's file write, safetensors' writer) fail as they do on a full file system, and the tests
check the one line, the exit code, that nothing of the user's is deleted and that no partial file stays.
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
    line = _one_line(err)
    assert code == 2 and "no space left on device while writing /dev/full: free space" in line, line


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


# -- a disk that fills up ------------------------------------------------------------------------
# No full file system here: the lowest-level writes fail as they do on one (see helpers.fill_disk_*):
# Python's file write with ENOSPC and no path, safetensors' writer with its own error naming os error 28.


def _train(run_cli, corpus: Path, run: Path) -> tuple[int, str]:
    code, _, err = run_cli("train", "--model", "tiny-random", "--data", corpus, "--steps", 3, "--seq-len", 16,
                           "--batch", 1, "--save-every", 1, "--quiet", "--out", run)  # fmt: skip
    return code, err


def _no_space_line(err: str, path: Path) -> str:
    """The one error line (train prints a line about the run before it starts)."""
    errors = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]
    assert f"error: no space left on device while writing {path}: free space or pass another --out" in line
    return line


def test_a_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(
    run_cli, corpus, tmp_path, monkeypatch
):
    from helpers import fill_disk_on_safetensors

    from adaptlab.rundir import RunDir, verify_checkpoint

    run = RunDir(tmp_path / "run")
    fill_disk_on_safetensors(monkeypatch, after=1)  # step-1 is written, step-2 finds the disk full
    code, err = _train(run_cli, corpus, run.root)
    line = _no_space_line(err, run.checkpoints / "step-2")
    assert code == 2 and f"adaptlab train --resume {run.root}" in line
    assert [p.name for p in run.checkpoint_dirs()] == ["step-1"]
    assert verify_checkpoint(run.checkpoints / "step-1") is None
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-1"]  # the partial step-2 is gone
    assert [r["step"] for r in run.read_metrics()] == [1, 2] and not run.is_finished()
    monkeypatch.undo()  # space freed: the run continues from step 1 to its end
    code, _, err = run_cli("train", "--resume", run.root, "--quiet")
    assert code == 0 and run.is_finished(), err


# (file that fills the disk, opens for writing before it, file named, metrics rows written whole): the
# first open of metrics.jsonl starts it empty, so the third is the row of step 2; step 3 has an eval row too
@pytest.mark.parametrize(
    ("name", "after", "written", "steps"),
    [("metrics.jsonl", 2, "metrics.jsonl", [1]), ("summary.json.tmp", 0, "summary.json", [1, 2, 3, 3])],
)
def test_a_disk_full_at_a_run_file_is_one_line_and_leaves_it_whole(
    run_cli, corpus, tmp_path, monkeypatch, name, after, written, steps
):
    from helpers import fill_disk_on_open

    from adaptlab.rundir import RunDir

    run = RunDir(tmp_path / "run")
    fill_disk_on_open(monkeypatch, Path, name, room=5, after=after)  # the failing write lands 5 bytes
    code, err = _train(run_cli, corpus, run.root)
    assert code == 2, err
    _no_space_line(err, run.root / written)
    assert [json.loads(x)["step"] for x in run.metrics.read_text().splitlines()] == steps  # no half row
    assert not run.is_finished()
    assert not list(run.root.glob("*.tmp")) and not list(run.root.glob(".adapter.*"))  # no partial file
    assert run.checkpoint_dirs() and run.config.exists()  # the resumable state stays


def test_a_disk_full_in_merge_is_one_line_and_leaves_nothing(run_cli, tmp_path, monkeypatch):
    from helpers import fill_disk_on_safetensors
    from test_adapters import make_adapter

    adapter = make_adapter(tmp_path / "ad", seed=5)
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    calls = fill_disk_on_safetensors(monkeypatch)
    code, _, err = run_cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 2 and calls, err
    _no_space_line(err, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no output, no temp dir beside it
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


def test_a_disk_full_in_export_is_one_line_and_leaves_no_truncated_gguf(run_cli, tmp_path, monkeypatch):
    import gguf.gguf_writer
    from helpers import fill_disk_on_open

    out = tmp_path / "gguf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fill_disk_on_open(monkeypatch, gguf.gguf_writer, "model-f16.gguf", room=4096)
    code, _, err = run_cli("export", "tiny-random", "--out", out, "--overwrite")
    assert code == 2, err
    _no_space_line(err, out / "model-f16.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no .gguf, no partial one
    assert (out / "notes.txt").read_text() == "mine"


def test_what_each_writer_raises_on_a_full_disk_is_recognised(tmp_path):
    import errno

    from safetensors import SafetensorError

    from adaptlab.errors import no_room_errno

    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    numpy_refusal = OSError("Not enough free space to write 80000000 bytes after offset 0")
    assert no_room_errno(rust, tmp_path / "x") == errno.ENOSPC
    assert no_room_errno(numpy_refusal, tmp_path / "x") == errno.ENOSPC
    assert no_room_errno(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path / "x") == errno.EDQUOT
    # not a full disk: these pass through unchanged (this disk has room)
    denied = SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")
    assert no_room_errno(denied, tmp_path / "x") is None
    assert no_room_errno(RuntimeError("unexpected pos 576 vs 534"), tmp_path / "x") is None
    assert no_room_errno(OSError(errno.ENOENT, "No such file"), tmp_path / "x") is None
