"""Small builders shared by tests: a text corpus on disk, a fast tiny-random run config, and `adaptlab train`
in a child process (torchrun runs)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adaptlab.config import RunConfig, build_config


def step_grads(model: Any, ids: Any, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """One forward (bf16 autocast when dtype is bf16) and backward: (the loss, every parameter's gradient)."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@contextmanager
def pefts_forward(model: Any) -> Iterator[Any]:
    """The model with its LoRA Linears on PEFT's own forward while inside (training fuses them:
    adaptlab.fused_lora), for exact comparisons with models loaded from files, which are not fused."""
    fused = {
        m: m.__dict__.pop("forward")
        for m in model.modules()
        if "forward" in m.__dict__ and hasattr(m, "lora_A")
    }
    try:
        yield model
    finally:
        for module, forward in fused.items():
            module.forward = forward


def undeclared_outputs(out: Path, kind: str) -> list[str]:
    """Entries a command wrote into `out` that adaptlab.outputs.WRITES does not list for its kind: a name
    missing there could be written over a user's file when `--overwrite` hands over their folder."""
    import fnmatch

    from adaptlab.outputs import LOCK, MARKER, WRITES

    names = [p.name for p in out.iterdir() if p.name not in (MARKER, LOCK)]
    return [n for n in names if not any(fnmatch.fnmatch(n, w) for w in WRITES[kind])]


def write_corpus(directory: Path, n_docs: int = 40) -> Path:
    """A JSONL corpus of real text (standard-library modules), one document a line."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:n_docs]
    path = directory / "corpus.jsonl"
    with path.open("w") as fh:
        for f in files:
            fh.write(json.dumps({"id": f.name, "text": f.read_text()[:3000]}) + "\n")
    return path


def tiny_config(data: Path, out: Path, method: str = "lora", **train: Any) -> RunConfig:
    """A run on tiny-random small enough to take a few seconds."""
    method_fields = {"method": method, "rank": 4}
    for key in ("rank", "alpha", "dropout", "rslora", "targets"):
        if key in train:
            method_fields[key] = train.pop(key)
    train_fields = {
        "steps": 4,
        "batch": 2,
        "seq_len": 32,
        "precision": "fp32",
        "eval_examples": 4,
        "lr": 1e-3,
    }
    train_fields.update(train)
    return build_config(
        {
            "model": {"name": "tiny-random"},
            "method": method_fields,
            "data": {"train": [str(data)]},
            "train": train_fields,
            "out": str(out),
        }
    )


def train_in_child(*args: str, timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """`adaptlab train ARGS` in a child process, one torch thread per process (the ranks share the cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "adaptlab", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------
# a disk that fills up: the write calls of the file system fail with ENOSPC, as write(2) does on a full one


def no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillingFile:
    """An open file on a disk with `room` bytes left: a write past it writes what fits, then fails with
    ENOSPC (write(2) on a full file system), naming no path as Python's own file write does not."""

    def __init__(self, fh: Any, room: int) -> None:
        self._fh = fh
        self.room = room

    def write(self, data: Any) -> int:
        if len(data) <= self.room:
            self.room -= len(data)
            return self._fh.write(data)
        self._fh.write(data[: self.room])
        self._fh.flush()
        self.room = 0
        raise no_space()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def fill_disk_on_open(monkeypatch: Any, where: Any, name: str, room: int = 0, after: int = 0) -> None:
    """Files whose name holds `name` (a temp name beside it too) opened for writing through `where.open`
    (pathlib.Path, or a module whose global `open` is patched) find `room` bytes left, from the open after
    the first `after` such opens."""
    import builtins

    real = getattr(where, "open", builtins.open)  # a module's `open` is the builtin one
    seen = {"n": 0}

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real(file, mode, *args, **kwargs)
        if name not in Path(file).name or not any(m in mode for m in "wax+"):
            return fh
        seen["n"] += 1
        return fh if seen["n"] <= after else FillingFile(fh, room)

    monkeypatch.setattr(where, "open", fake_open, raising=False)


def fill_disk_on_safetensors(monkeypatch: Any, after: int = 0, room: int = 64) -> list[str]:
    """safetensors' writer (serialize_file, under every save_file) writes `room` bytes of a file, then fails
    as it does on a full disk (SafetensorError naming os error 28), from the call after the first `after`;
    returns the paths it was asked to write."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.serialize_file
    calls: list[str] = []

    def fake_serialize(tensors: Any, filename: Any, metadata: Any = None) -> None:
        calls.append(str(filename))
        if len(calls) <= after:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * room)  # what fitted before the disk was full
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", fake_serialize)
    return calls
