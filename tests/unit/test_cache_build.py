"""Embedded models on a fresh machine: built once into an empty cache, safely when several processes
ask at the same time, and said in one line of adaptlab's own, never a library's progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from adaptlab.models import build_atomically

BUILD_LINE = "into the cache"

# load the embedded model, then print what was read from its directory
LOAD_AND_READ = """
from adaptlab.models import load_model
m = load_model("tiny-random")
print(m.path, sum(p.numel() for p in m.model.parameters()), len(m.tokenizer))
"""


def _child(code: str, cache: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "ADAPTLAB_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_processes_started_together_on_an_empty_cache_all_read_a_whole_model(tmp_path) -> None:
    cache = tmp_path / "cache"
    children = [_child(LOAD_AND_READ, cache) for _ in range(3)]
    outputs = [c.communicate(timeout=600) for c in children]
    results = [(c.returncode, out, err) for c, (out, err) in zip(children, outputs)]
    for code, _, err in results:
        assert code == 0, err
    assert len({out for _, out, _ in results}) == 1, results  # every one read the same whole model
    builds = [line for _, _, err in results for line in err.splitlines() if BUILD_LINE in line]
    assert len(builds) == 1 and "building tiny-random" in builds[0] and "once: about" in builds[0], builds
    for _, _, err in results:  # no library progress bar or other noise: at most adaptlab's one line
        assert [line for line in err.splitlines() if BUILD_LINE not in line] == [], err
    model_dir = cache / "v1" / "models" / "tiny-random"
    assert (model_dir / ".complete").exists() and (model_dir / "tokenizer.json").exists()
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["tiny-random", "tiny-random.lock"]


def test_a_refusal_on_an_empty_cache_is_one_error_line(tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    cmd = "import sys; from adaptlab.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [
        "train",
        "--model",
        "tiny-random",
        "--steps",
        "1",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "r"),
    ]
    child = _child(cmd, tmp_path / "cache", *args)
    err = child.communicate(timeout=600)[1]
    code = child.returncode
    assert code == 2, err
    lines = [line for line in err.splitlines() if BUILD_LINE not in line]
    assert len(lines) == 1 and f"{data}:2: not UTF-8" in lines[0], err
    assert len(err.splitlines()) <= 2, err  # besides the error, at most the one line saying a build happens


def test_a_complete_build_is_reused_and_never_removed(tmp_path) -> None:
    target = tmp_path / "m"
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights").write_text("whole")

    assert build_atomically(target, build, "m", about_s=1) == target
    inode = (target / "weights").stat().st_ino
    build_atomically(target, build, "m", about_s=1)
    assert len(calls) == 1 and (target / "weights").stat().st_ino == inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.lock"]


def test_builders_racing_in_one_process_build_once(tmp_path) -> None:
    target = tmp_path / "m"
    started, calls, seen = threading.Event(), [], []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        started.set()
        threading.Event().wait(0.3)  # the other thread arrives while this build is under way
        (tmp / "weights").write_text("whole")

    def ask() -> None:
        out = build_atomically(target, build, "m", about_s=1)
        seen.append((out / "weights").read_text())

    first = threading.Thread(target=ask)
    first.start()
    started.wait(5)
    second = threading.Thread(target=ask)
    second.start()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and seen == ["whole", "whole"]


def test_a_failed_build_leaves_nothing_and_an_incomplete_leftover_is_replaced(tmp_path) -> None:
    target = tmp_path / "m"

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_atomically(target, broken, "m", about_s=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lock"]

    target.mkdir()  # a directory without `.complete`: not a finished build
    (target / "half").write_text("x")
    build_atomically(target, lambda tmp: (tmp / "weights").write_text("whole"), "m", about_s=1)
    assert sorted(p.name for p in target.iterdir()) == [".complete", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.lock"]
