"""Output ownership: which directories adaptlab may write into, and one writer per directory at a time.

A directory adaptlab writes (a run, a comparison, an analysis, a merged model) carries a marker file,
`.adaptlab`, written before anything else: what kind of output it is and which command wrote it.
adaptlab writes only into a missing or empty directory, a directory it marked, or one the user hands
over with `--overwrite`. In a directory it marked, `--overwrite` replaces what adaptlab wrote there
before. In one it did not mark, `--overwrite` lets it write beside the user's files, and only when none
of them bears a name the command writes (`WRITES`): a file adaptlab did not write is never replaced or
deleted. The marker is written only after every check has passed, and a command that fails before
writing anything takes it away again.

A lock (`.adaptlab.lock`, fcntl.flock) is held by the writing process for as long as it writes. The
kernel releases it when the process exits, however it exits, so a lock left by a dead process never
blocks; the file records the holder (pid, host, command) for the message a second writer gets.

    with owned(Path("runs/lora"), "run"):
        ...  # write the run
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from adaptlab.errors import UserError

MARKER = ".adaptlab"
LOCK = ".adaptlab.lock"

# What `adaptlab train` writes into a run directory (globs relative to it): the only paths a fresh
# start (or a retrain inside a comparison) may remove. Anything else in the directory is kept.
RUN_OUTPUTS = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "adapter",
    "model",
    ".adapter.*",
    ".model.*",
    "checkpoints/step-*",
    "checkpoints/.step-*",
    "reference_logps.safetensors",
    "eval.json",
    "analysis.json",
    "intruders.png",
    "rel_update_norm.png",
    "tensorboard",
)

WRITES: dict[str, tuple[str, ...]] = {
    "run": tuple(sorted({p.split("/")[0] for p in RUN_OUTPUTS})),
    "comparison": (
        "compare.yaml",
        "results.json",
        "report.md",
        "report.html",
        "plots",
        "runs",
        "data",
        "tensorboard",
        "mlruns",
    ),
    "compare": ("results.json", "report.md", "runs", "sft-answers.jsonl"),
    "decision": ("decide.yaml", "design.json", "decision.json", "decision.md", "compare"),
    "export": ("*.gguf", "export.json", "Modelfile"),
    "analysis": ("analysis.json", "intruders.png", "rel_update_norm.png"),
    "mitigated adapter": ("adapter_config.json", "adapter_model.safetensors", "mitigation.json", "README.md"),
    "mitigation sweep": ("lambda-*", "sweep.json", "sweep.png"),
    "model": (
        "config.json",
        "generation_config.json",
        "model*.safetensors",
        "model.safetensors.index.json",
        "tokenizer*",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.*",
    ),
    # one folder per domain (legal, systems), the regime study's wordnet, continual's A-then-B, the rl
    # task's arithmetic (reproduce.plan's comparison keys)
    "reproduction": ("findings.json", "legal", "systems", "wordnet", "*-then-*", "arithmetic"),
}
"""The top-level names (globs) each kind of output writes: `--overwrite` into a directory adaptlab did
not mark is refused while any of the user's entries matches one. A kind missing here (a merged model,
whose files are named by the model's own format) is never written beside a user's files."""


def marker_kind(path: Path) -> str | None:
    """The kind recorded in path's marker (\"run\", \"comparison\", ...), or None when unmarked."""
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return "unknown" if (path / MARKER).exists() else None
    return str(data.get("kind", "unknown")) if isinstance(data, dict) else "unknown"


def _foreign_entries(path: Path, inputs: Sequence[str | Path]) -> list[Path]:
    """Entries of path other than adaptlab's marker and lock and the command's own input files."""
    keep = {Path(p).resolve() for p in inputs}
    return [p for p in path.iterdir() if p.name not in (MARKER, LOCK) and p.resolve() not in keep]


def not_a_file(path: Path) -> None:
    """Raise UserError when an output directory's path names a file (or a broken link)."""
    if path.is_symlink() and not path.exists():
        raise UserError(f"--out {path} is a broken symbolic link: choose another --out")
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file: give a directory (new, empty, or written by adaptlab)")


def check_out(path: Path, kind: str, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Raise UserError unless adaptlab may write a `kind` output into path (see the module docstring)."""
    not_a_file(path)
    if not path.exists():
        return
    found = marker_kind(path)
    if found == kind or (found is not None and overwrite):
        return
    if found is not None:
        raise UserError(
            f"{path} holds an adaptlab {found}, not {_a(kind)}: choose another --out, or pass --overwrite"
        )
    foreign = _foreign_entries(path, inputs)
    if foreign and not overwrite:
        raise UserError(
            f"{path} exists and holds files adaptlab did not write: choose another --out, or pass "
            "--overwrite (adaptlab then writes beside them and never replaces one)"
        )
    if foreign and kind not in WRITES:
        raise UserError(f"{path} exists and holds files adaptlab did not write: choose another --out")
    clashes = sorted(p.name for p in foreign if any(fnmatch.fnmatch(p.name, w) for w in WRITES.get(kind, ())))
    if clashes:
        raise UserError(
            f"{path} holds {', '.join(clashes[:4])}{' ...' if len(clashes) > 4 else ''}, not written by "
            f"adaptlab, which this {kind} would write over: move them, or choose another --out"
        )


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def check_file_out(path: Path, keys: Sequence[str], overwrite: bool = False) -> None:
    """Raise UserError unless adaptlab may write the JSON file path: new, or a JSON object with `keys`
    (one adaptlab wrote), or `overwrite`."""
    if path.is_dir():
        raise UserError(f"--out {path} is a directory: give a file name")
    if not path.exists() or overwrite:
        return
    if not path.is_file():  # a device such as /dev/full would be read without end
        raise UserError(f"--out {path} is not a regular file: choose another --out, or pass --overwrite")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    if not (isinstance(data, dict) and all(k in data for k in keys)):
        raise UserError(
            f"{path} exists and was not written by adaptlab: choose another --out, or pass --overwrite"
        )


def mark(path: Path, kind: str) -> None:
    """Write path's marker (path must exist): the kind of output and the command that wrote it."""
    info = {"kind": kind, "written_by": "adaptlab", "command": _command(), "created": time.time()}
    (path / MARKER).write_text(json.dumps(info) + "\n")


def claim(path: Path, kind: str, overwrite: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Check that path may hold a `kind` output, create it and mark it (the marker is written first)."""
    check_out(path, kind, overwrite, inputs)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if marker_kind(path) != kind:
            mark(path, kind)
    except OSError as err:
        raise UserError(f"can't write to {path}: {err.strerror or err}") from None


def clear(path: Path, patterns: Sequence[str] = RUN_OUTPUTS) -> None:
    """Remove adaptlab's own named outputs (globs relative to path) from a claimed directory."""
    for pattern in patterns:
        for p in path.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _command() -> str:
    argv = sys.argv or ["python"]
    prog = Path(argv[0]).name
    if prog in ("adaptlab", "__main__.py") and len(argv) > 1:
        return f"adaptlab {argv[1]}"
    return prog or "python"


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} ({_command()})"


def _open_lock(path: Path) -> IO[str]:
    try:
        return open(os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as err:
        raise UserError(f"can't write to {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold path's lock while the block runs; a second writer gets UserError naming the holder."""
    fh = _open_lock(path)
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip() or "another process"
            raise UserError(
                f"{path} is in use by {holder}: wait for it to finish or stop it, or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(_holder_text() + "\n")
        fh.flush()
        yield
    finally:
        fh.close()  # closing the last descriptor releases the lock


@contextlib.contextmanager
def owned(
    path: Path, kind: str, overwrite: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[None]:
    """Claim path for a `kind` output and hold its lock while the block writes it.

    A directory adaptlab had not marked (absent, empty, or the user's, handed over with `overwrite`) that
    the failed command left holding nothing new but the marker and the lock is returned to how it was
    (removed, or unmarked again), so a mistake leaves no trace and a later command does not take the
    user's directory for adaptlab's.
    """
    existed = path.exists()
    before = _names(path) if existed and path.is_dir() and marker_kind(path) is None else None
    claim(path, kind, overwrite, inputs)
    with locked(path):
        try:
            yield
        except BaseException:
            if before is not None or not existed:  # still under the lock: no other writer has started
                _unmark_if_untouched(path, before or set(), remove_dir=not existed)
            raise


def _names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def _unmark_if_untouched(path: Path, before: set[str], remove_dir: bool) -> None:
    with contextlib.suppress(OSError):
        if _names(path) - {MARKER, LOCK} <= before:
            for name in (MARKER, LOCK):
                (path / name).unlink(missing_ok=True)
            if remove_dir:
                path.rmdir()
