"""The run directory contract: config.yaml, metrics.jsonl, summary.json, adapter/ or model/, checkpoints/.

    RUN/config.yaml        the fully resolved config
    RUN/metrics.jsonl      one JSON object per logged step (and eval rows with split, val_loss)
    RUN/summary.json       written last: a run without it did not finish
    RUN/adapter/           LoRA family, PEFT format      RUN/model/  full fine-tuning, HF format
    RUN/checkpoints/step-N/ trainable.safetensors, optimizer.pt, state.json (written to a temp dir, renamed)

Checkpoints hold only trainable parameters (the frozen base is rebuilt from the config), the optimizer
and scheduler state, every RNG state and the step, so a resumed run continues bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import adaptlab
from adaptlab.errors import UserError


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

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

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
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        _atomic_write(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = [p for p in self.checkpoints.glob("step-*") if (p / "state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_checkpoint(
    run: RunDir,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write RUN/checkpoints/step-N atomically (temp dir + rename) and keep the newest `keep`."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoints / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=run.checkpoints))
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors")
        )
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    older = sorted(
        (p for p in run.checkpoints.glob("step-*") if p != final), key=lambda p: int(p.name.split("-")[1])
    )
    for p in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore trainable weights, optimizer, scheduler and RNG; return state.json."""
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        raise UserError(
            f"checkpoint {path} does not match this run's trainable parameters: was the config edited?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    blob = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())


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
