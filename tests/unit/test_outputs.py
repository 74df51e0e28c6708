"""Output ownership, locks and child processes: adaptlab never loses a user's files.

Directories adaptlab did not write are refused (or, with --overwrite, only adaptlab's own outputs in
them are replaced); a second writer on the same run or comparison is refused while the first runs;
a comparison's training children die with it. The two-process cases start real processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import undeclared_outputs, write_corpus

import adaptlab
from adaptlab.outputs import LOCK, MARKER, claim, clear

TRAIN = ["train", "--model", "tiny-random", "--steps", "2", "--batch", "2", "--seq-len", "32", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), n_docs=20)


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _spawn(*args: str) -> subprocess.Popen[str]:
    src = Path(adaptlab.__file__).resolve().parents[1]  # the source under test, also in the child
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "adaptlab", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _holder_pid(directory: Path) -> int | None:
    """The pid recorded in directory's lock file, if any."""
    try:
        found = re.match(r"pid (\d+)", (directory / LOCK).read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _train_child_of(parent: int, timeout: float = 120.0) -> int:
    """The pid of parent's child `adaptlab train` process, once it has one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and b"train" in (proc / "cmdline").read_bytes().split(b"\0"):
                    return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"process {parent} started no `adaptlab train` within {timeout} s")


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def _wait_for_holder(directory: Path, pid: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _holder_pid(directory) != pid:
        assert time.monotonic() < deadline, f"process {pid} did not take the lock of {directory}"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited and waits only to be reaped


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


# ---------------------------------------------------------------------------- 1: train --out ownership


def test_train_refuses_a_folder_it_did_not_write(run_cli, corpus, tmp_path):
    out = tmp_path / "d"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text("mine\n")
    (out / "checkpoints" / "notes.txt").write_text("keep\n")
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out)
    assert code == 2 and "--overwrite" in _one_line(err)
    assert (out / "config.yaml").read_text() == "mine\n"
    assert (out / "checkpoints" / "notes.txt").read_text() == "keep\n"
    assert not (out / MARKER).exists()


def test_train_overwrite_never_replaces_a_users_file(run_cli, corpus, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    mine = {
        "config.yaml": "mine\n",
        "NOTES.txt": "keep\n",
        "eval.json": "{}\n",
        "checkpoints/notes.txt": "keep\n",
    }
    for name, text in mine.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_text(text)
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out, "--overwrite")
    line = _one_line(err)
    assert code == 2 and all(n in line for n in ("checkpoints", "config.yaml", "eval.json")), line
    assert "NOTES.txt" not in line
    assert {n: (out / n).read_text() for n in mine} == mine
    assert not (out / MARKER).exists()  # refused: the folder is still the user's, not adaptlab's
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out)
    assert code == 2 and "--overwrite" in _one_line(err)
    for name in ("config.yaml", "eval.json", "checkpoints/notes.txt", "checkpoints"):
        path = out / name
        path.rmdir() if path.is_dir() else path.unlink()
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out, "--overwrite")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name"] == "tiny-random"
    assert (out / "NOTES.txt").read_text() == "keep\n" and (out / "summary.json").exists()
    assert undeclared_outputs(out, "run") == ["NOTES.txt"]
    # a finished run is still refused without --overwrite, and replaced (keeping NOTES.txt) with it
    assert run_cli(*TRAIN, "--data", corpus, "--out", out)[0] == 2
    assert run_cli(*TRAIN, "--data", corpus, "--out", out, "--overwrite", "--method", "full")[0] == 0
    assert (out / "model").is_dir() and not (out / "adapter").exists()
    assert (out / "NOTES.txt").read_text() == "keep\n"


def test_every_kind_refuses_to_write_over_a_users_file(tmp_path):
    from adaptlab.errors import UserError
    from adaptlab.outputs import WRITES, check_out

    for kind, names in WRITES.items():
        for name in names:
            out = tmp_path / f"{kind}-{name}".replace("*", "x").replace(" ", "-")
            out.mkdir()
            (out / name.replace("*", "x")).write_text("mine\n")
            with pytest.raises(UserError, match="would write over"):
                check_out(out, kind, overwrite=True)
    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "NOTES.txt").write_text("mine\n")
    for kind in WRITES:
        check_out(beside, kind, overwrite=True)  # nothing of the user's would be written over
    with pytest.raises(UserError, match="did not write"):
        check_out(beside, "artifact", overwrite=True)  # a merged model's file names are the model's


def test_out_that_is_a_file_is_one_line(run_cli, corpus, tmp_path):
    path = tmp_path / "f"
    path.write_text("mine\n")
    for args in (
        [*TRAIN, "--data", corpus, "--out", path],
        ["compare", "--model", "tiny-random", "--data", corpus, "--tokens", "64", "--out", path],
        ["model", "save", "tiny-random", path],
    ):
        code, _, err = run_cli(*args)
        assert code == 2 and "is a file" in _one_line(err), args
    assert path.read_text() == "mine\n"


def test_a_failed_start_leaves_no_directory(run_cli, tmp_path):
    code, _, err = run_cli(*TRAIN, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "run")
    assert code == 2 and not (tmp_path / "run").exists()


def test_a_failed_start_in_an_empty_folder_leaves_it_empty(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = run_cli(*TRAIN, "--data", tmp_path / "missing.jsonl", "--out", out)
    assert code == 2 and out.is_dir() and list(out.iterdir()) == []


def test_eval_out_refuses_a_file_it_did_not_write(run_cli, corpus, tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"mine": 1}\n')
    code, _, err = run_cli(
        "eval", "--model", "tiny-random", "--data", corpus, "--split", "all", "--out", path
    )
    assert code == 2 and "--overwrite" in _one_line(err)
    assert path.read_text() == '{"mine": 1}\n'


def test_analyze_refuses_a_folder_it_did_not_write(run_cli, tmp_path):
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "analysis.json").write_text("mine\n")
    code, _, err = run_cli("analyze", "--tuned", tmp_path, "--out", out)
    assert code == 2 and "--overwrite" in _one_line(err)
    assert (out / "analysis.json").read_text() == "mine\n"


# ------------------------------------------------------------------------- 2: compare --out ownership


def test_compare_refuses_a_folder_it_did_not_write(run_cli, corpus, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "report.md").write_text("my report\n")
    args = ["compare", "--model", "tiny-random", "--data", corpus, "--tokens", "64", "--seeds", "1"]
    code, _, err = run_cli(*args, "--out", out)
    assert code == 2 and "--overwrite" in _one_line(err)
    assert (out / "report.md").read_text() == "my report\n"


def test_compare_keeps_user_files_in_a_run_folder(run_cli, corpus, tmp_path):
    out = tmp_path / "cmp"
    claim(out, "comparison")  # a comparison adaptlab started earlier
    (out / "runs" / "lora").mkdir(parents=True)
    (out / "runs" / "lora" / "NOTES.txt").write_text("keep\n")
    args = ["compare", "--model", "tiny-random", "--data", corpus, "--tokens", "64", "--seeds", "1"]
    code, _, err = run_cli(*args, "--out", out)
    assert code == 2 and "runs/lora" in _one_line(err)
    assert (out / "runs" / "lora" / "NOTES.txt").read_text() == "keep\n"


def test_compare_never_writes_its_own_config_file(run_cli, corpus, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    config = out / "compare.yaml"
    text = f"# my comparison\nmodel: tiny-random\ndata: {{train: [{corpus}]}}\nstudy: methods\ntokens: 64\n"
    config.write_text(text)
    # an unknown --force arm stops the comparison after it has resolved its spec, before training
    code, _, err = run_cli("compare", "--config", config, "--out", out, "--force", "nosuch")
    assert code == 2 and "nosuch" in _one_line(err)
    assert config.read_text() == text


def test_retrain_clears_only_adaptlab_outputs(tmp_path):
    run = tmp_path / "run"
    claim(run, "run")
    for name in ("config.yaml", "summary.json", "NOTES.txt", "adapter/adapter_config.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "checkpoints" / "mine").mkdir()
    clear(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [MARKER, "NOTES.txt", "checkpoints", "checkpoints/mine"]


# ------------------------------------------------------------------ 3: concurrent writers and orphans


def test_second_train_on_the_same_out_is_refused(run_cli, corpus, tmp_path):
    out = tmp_path / "run"
    first = _spawn(*TRAIN, "--steps", "100000", "--data", str(corpus), "--out", str(out))
    try:
        _wait_for(out / "metrics.jsonl")  # the first process is training
        code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out)
        assert code == 2 and f"pid {first.pid}" in _one_line(err)
    finally:
        _stop(first)
    # the kernel released the dead holder's lock: the run can be written again
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--out", out, "--overwrite")
    assert code == 0, err


def _compare_config(corpus: Path, path: Path) -> Path:
    spec = {
        "model": "tiny-random",
        "data": {"train": [str(corpus)]},
        "general": [str(corpus)],
        "drift": False,
        "tokens": 10**8,
        "seeds": 1,
        "train": {"batch": 1, "seq_len": 16, "eval_points": 1, "checkpoints": 0},
        "analysis": {"enabled": False},
        "arms": [{"name": "lora", "method": "lora", "rank": 2}],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_second_compare_on_the_same_out_is_refused(run_cli, corpus, tmp_path):
    config, out = _compare_config(corpus, tmp_path / "c.yaml"), tmp_path / "cmp"
    first = _spawn("compare", "--config", str(config), "--out", str(out))
    try:
        child = _train_child_of(first.pid)
        _wait_for(out / "runs" / "lora" / "config.yaml")  # the arm is training
        # before any arm trains, an unknown --force arm stops a comparison that got past the lock
        code, _, err = run_cli("compare", "--config", config, "--out", out, "--force", "nosuch")
        assert code == 2 and f"in use by pid {first.pid}" in _one_line(err)
    finally:
        _stop(first)
        _gone_within(child, 10)


def test_compare_children_die_with_it_and_a_rerun_resumes(corpus, tmp_path):
    config, out = _compare_config(corpus, tmp_path / "c.yaml"), tmp_path / "cmp"
    first = _spawn("compare", "--config", str(config), "--out", str(out))
    try:
        child = _train_child_of(first.pid)
        _wait_for(out / "runs" / "lora" / "config.yaml")  # the arm is training
        os.kill(first.pid, signal.SIGKILL)
        assert _gone_within(child, 10), "the arm's training process outlived its comparison"
    finally:
        _stop(first)
    # a rerun takes over the dead comparison's locks, resumes the arm; SIGTERM stops it and its child
    again = _spawn("compare", "--config", str(config), "--out", str(out))
    try:
        child2 = _train_child_of(again.pid)
        _wait_for_holder(out / "runs" / "lora", child2)
        assert _holder_pid(out) == again.pid
        os.kill(again.pid, signal.SIGTERM)
        assert again.wait(timeout=60) == 143
        assert _gone_within(child2, 10), "SIGTERM left the arm's training process running"
        assert "lora: resuming" in again.stderr.read()
    finally:
        _stop(again)


def test_model_save_replaces_its_own_output_only_with_overwrite(run_cli, tmp_path):
    out = tmp_path / "saved"
    assert run_cli("model", "save", "tiny-random", out)[0] == 0
    (out / "notes.txt").write_text("mine")  # the user's file, added beside the saved model
    (out / "model-00002-of-00002.safetensors").write_bytes(b"")  # as an earlier, sharded save left it
    code, _, err = run_cli("model", "save", "tiny-random", out)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {out} holds a model saved earlier: pass --overwrite to replace it, or choose another OUT"
    ]
    code, _, err = run_cli("model", "save", "tiny-random", out, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "model-00002-of-00002.safetensors").exists()  # the earlier save's, replaced
    assert (out / "model.safetensors").stat().st_size > 0 and not list(tmp_path.glob(".saved.*"))


def test_model_save_overwrite_writes_beside_a_users_files_never_over_one(run_cli, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    code, _, err = run_cli("model", "save", "tiny-random", users)
    assert code == 2 and "pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert run_cli("model", "save", "tiny-random", users, "--overwrite")[0] == 0
    assert (users / "notes.txt").read_text() == "mine" and (users / "config.json").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    code, _, err = run_cli("model", "save", "tiny-random", theirs, "--overwrite")
    assert code == 2 and "config.json" in err and len(err.strip().splitlines()) == 1
    assert (theirs / "config.json").read_text() == "{}"
