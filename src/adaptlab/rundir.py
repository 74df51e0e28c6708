"""The run directory contract: config.yaml, metrics.jsonl, summary.json, adapter/ or model/, checkpoints/.

    RUN/config.yaml        the fully resolved config
    RUN/metrics.jsonl      one JSON object per logged step (and eval rows with split, val_loss)
    RUN/summary.json       written last: a run without it did not finish
    RUN/adapter/           LoRA family, PEFT format      RUN/model/  full fine-tuning, HF format
    RUN/checkpoints/step-N/ trainable.safetensors, optimizer.pt, state.json, manifest.json (temp dir, renamed)

Checkpoints hold only trainable parameters (the frozen base is rebuilt from the config), the optimizer
and scheduler state, every RNG state and the step, so a resumed run continues bit-for-bit on CPU.
manifest.json, written last, holds each file's size and sha256: a resume takes the newest checkpoint
that verifies and skips (and names) the others. Checkpoints, config.yaml and summary.json are flushed to
disk (fsync) before they are renamed into place, and their directory after, so a power loss leaves the
old file or the new one, never an empty one. adapter/ and model/ are written in a temp dir beside them
(RUN/.adapter.XXXX) and renamed into place, so a failed write (a full disk) leaves no half artifact.
A write that finds the disk full names the file it was writing (adaptlab.errors.writing).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import adaptlab
from adaptlab.errors import UserError, writing

TEMP_PREFIX = ".step-"
"""Checkpoint writes go to RUN/checkpoints/.step-N.XXXX until they are renamed to step-N."""


class RunDir:
    """Paths and files of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    adapter = property(lambda self: self.root / "adapter")
    model = property(lambda self: self.root / "model")
    checkpoints = property(lambda self: self.root / "checkpoints")

    def is_finished(self) -> bool:
        return self.summary.exists()

    def holds_config(self, config_yaml: str) -> bool:
        """Whether this run was started with the config `config_yaml` (as RunConfig.to_yaml writes it)."""
        import yaml

        return self.config.exists() and yaml.safe_load(self.config.read_text()) == yaml.safe_load(config_yaml)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row; a write that fails leaves the file as it was (no half row)."""
        size = self.metrics.stat().st_size if self.metrics.exists() else 0
        try:
            with writing(self.metrics), self.metrics.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        except BaseException:
            with contextlib.suppress(OSError):
                os.truncate(self.metrics, size)
            raise

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        rows = []
        for line in self.metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is untrustworthy
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Keep only rows up to `step` (rows logged after the checkpoint a resume starts from go)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def write_config(self, text: str) -> None:
        atomic_write(self.config, text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def checkpoint_dirs(self) -> list[Path]:
        """RUN/checkpoints/step-N folders, newest first (whether they verify or not)."""
        if not self.checkpoints.is_dir():
            return []
        steps = [p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint folder with a state.json (not verified: see newest_valid_checkpoint)."""
        return next((p for p in self.checkpoint_dirs() if (p / "state.json").exists()), None)

    def clean_temp_checkpoints(self) -> list[Path]:
        """Remove the temp folders of checkpoint writes a killed process left behind; return them."""
        if not self.checkpoints.is_dir():
            return []
        stale = [p for p in self.checkpoints.glob(f"{TEMP_PREFIX}*") if p.is_dir()]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return stale


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to the disk (so a power loss keeps them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (path.is_dir() and err.errno == errno.EINVAL):  # some file systems cannot sync a directory
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temp file, flushed to disk, renamed over it, the rename flushed.
    A failed write removes the temp file and leaves `path` as it was."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with writing(path), tmp.open("w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_path(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final` durably: its files and entries are flushed to
    disk before the rename, and the parent's entry after it."""
    for file in tmp.rglob("*"):
        if file.is_file():
            fsync_path(file)
    for directory in sorted((d for d in tmp.rglob("*") if d.is_dir()), reverse=True):
        fsync_path(directory)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Build the directory `final` by `write(tmp)` in a temp dir beside it (RUN/.adapter.XXXX), then rename
    it into place over adaptlab's earlier one: a failed write leaves `final` as it was and no temp dir."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with writing(final):
            write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG's state, as types torch.load(weights_only=True) accepts (no arbitrary pickle)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")
"""A one-process checkpoint; a sharded one (torch.distributed.checkpoint, format "dcp") holds
DCP_FILES plus one shard file per rank."""
DCP_FILES = (".metadata", "extra.pt", "state.json")
MANIFEST = "manifest.json"
STATE_FIELDS = {"step": int, "tokens_seen": int, "train_time_s": (int, float), "wall_s": (int, float)}


class CorruptCheckpoint(Exception):
    """A checkpoint that does not verify or does not load; the message says why."""


@dataclass
class Checkpoint:
    """A checkpoint that verified, read into memory (nothing of the run is touched until it is restored).

    A sharded checkpoint (format "dcp") is read collectively by every rank when it is restored, so
    only its state.json is read here and weights and blob stay empty."""

    path: Path
    weights: dict[str, torch.Tensor]
    blob: dict[str, Any]
    """optimizer, scheduler and rng states."""
    state: dict[str, Any]
    """state.json: step, tokens_seen, train_time_s, wall_s (and what the loop adds)."""
    format: str = "single"


def save_checkpoint(
    run: RunDir,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    protect: Path | None = None,
) -> Path:
    """Write RUN/checkpoints/step-N atomically (temp dir + rename) and keep the newest `keep`.

    manifest.json (each file's size and sha256) is written last, so a checkpoint verifies only if
    every byte of it was written. `protect` is a checkpoint the rotation keeps whatever its age.
    """
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoints / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{step}.", dir=run.checkpoints))
    try:
        with writing(final):
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in params.items()},
                str(tmp / "trainable.safetensors"),
            )
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                },
                tmp / "optimizer.pt",
            )
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            write_manifest(tmp, "single")
            replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    older = [p for p in run.checkpoint_dirs() if p not in (final, protect)]
    for p in older[max(0, keep - 1) :]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, fmt: str) -> None:
    """Write manifest.json (the format, and each file's size and sha256): the last file of a checkpoint."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    files = {
        name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in names
    }
    (directory / MANIFEST).write_text(json.dumps({"format": fmt, "files": files}, indent=2))


def checkpoint_format(path: Path) -> str:
    """ "dcp" or "single", as the manifest says (a missing or unreadable manifest: "single")."""
    try:
        return str(json.loads((path / MANIFEST).read_text()).get("format", "single"))
    except (OSError, ValueError, AttributeError):
        return "single"


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the checkpoint matches its manifest; otherwise what does not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        required = DCP_FILES if manifest.get("format") == "dcp" else CHECKPOINT_FILES
        expected = {
            name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in {*required, *files}
        }
    except FileNotFoundError:
        return f"no {MANIFEST} (an unfinished write, or written before checksums)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, sha) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if _sha256(file) != sha:
            return f"{name} does not match its checksum"
    return None


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify and read a checkpoint; CorruptCheckpoint says what is wrong with it."""
    if (problem := verify_checkpoint(path)) is not None:
        raise CorruptCheckpoint(problem)
    fmt = checkpoint_format(path)
    weights: dict[str, torch.Tensor] = {}
    blob: dict[str, Any] = {}
    try:
        if fmt == "single":
            weights = load_file(str(path / "trainable.safetensors"))
            blob = torch.load(path / "optimizer.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception as err:  # a file that verifies but does not parse: whatever the parser raises
        raise CorruptCheckpoint(f"does not load ({type(err).__name__})") from err
    if fmt == "single" and (
        not isinstance(blob, dict) or not {"optimizer", "scheduler", "rng"} <= blob.keys()
    ):
        raise CorruptCheckpoint("optimizer.pt lacks the optimizer, scheduler or RNG state")
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in STATE_FIELDS.items()):
        raise CorruptCheckpoint("state.json lacks " + ", ".join(STATE_FIELDS))
    if f"step-{state['step']}" != path.name:
        raise CorruptCheckpoint(f"state.json says step {state['step']}")
    return Checkpoint(path=path, weights=weights, blob=blob, state=state, format=fmt)


def newest_valid_checkpoint(run: RunDir) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies and loads, and the newer ones skipped with the reason."""
    skipped = []
    for path in run.checkpoint_dirs():
        try:
            return read_checkpoint(path), skipped
        except CorruptCheckpoint as err:
            skipped.append((path, str(err)))
    return None, skipped


def restore_checkpoint(
    ckpt: Checkpoint, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Put trainable weights, optimizer, scheduler and RNG back as they were; return state.json."""
    if set(ckpt.weights) != set(params):
        raise UserError(
            f"checkpoint {ckpt.path} does not match this run's trainable parameters: was the config edited?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(ckpt.blob["optimizer"])
    scheduler.load_state_dict(ckpt.blob["scheduler"])
    set_rng_state(ckpt.blob["rng"])
    return ckpt.state


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def versions() -> dict[str, str | None]:
    import peft
    import transformers

    sha = None
    try:
        here = Path(adaptlab.__file__).resolve().parent
        sha = (
            subprocess.run(
                ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "adaptlab": adaptlab.__version__,
        "git_sha": sha,
    }
