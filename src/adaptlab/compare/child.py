"""One arm's training run as a job: `train_run` trains (or resumes, or skips) it in a child
`adaptlab train` process writing OUT/runs/<run>/, streams its metrics as progress events, and stops the
child with the comparison. Every executor (executors.py, inline.py) runs its jobs through this.

    python -c "from adaptlab.compare.child import train_run; help(train_run)"
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adaptlab import outputs
from adaptlab.compare.arms import RunPlan
from adaptlab.compare.spec import CompareSpec
from adaptlab.config import build_config
from adaptlab.rundir import RunDir

OnEvent = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    """One training run to execute: its plan, whether it is forced, and its place in the comparison."""

    plan: Any  # compare.arms.RunPlan
    force: bool
    index: int
    total: int
    overwrite: bool = False


class Executor(Protocol):
    def train_runs(
        self, jobs: list[Job], spec: Any, out: Path, on_event: OnEvent
    ) -> dict[str, dict[str, Any]]:
        """Train every job; return each run's status dict keyed by run name."""
        ...


def locked_events(on_event: OnEvent) -> OnEvent:
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        with lock:
            on_event(event)

    return emit


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _last_line(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [
        x for x in lines if x.startswith(("error:", "Error", "RuntimeError", "MemoryError")) or "Error:" in x
    ]
    return (errors or lines or ["no output"])[-1][:300]


def train_run(
    plan: RunPlan,
    spec: CompareSpec,
    out: Path,
    force: bool,
    on_event: OnEvent,
    index: int,
    total: int,
    python: str = sys.executable,
    overwrite: bool = False,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or skip) one run in a child process; returns {"status", "run_dir", ...}."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = runs / plan.run
    outputs.claim(run_dir, "run", overwrite=overwrite)
    config = build_config(plan.run_config(spec, str(run_dir)))
    text = config.to_yaml()
    rd = RunDir(run_dir)
    base_event = {"run": plan.run, "arm": plan.arm, "index": index, "total": total}
    stale = rd.config.exists() and not rd.holds_config(text)
    if force or stale or (not rd.config.exists() and _has_outputs(run_dir)):
        reason = "forced" if force else ("its config changed" if stale else "it holds an incomplete run")
        on_event({"event": "retrain", "reason": reason, **base_event})
        outputs.clear(run_dir)  # adaptlab's own outputs only; other files in the run directory stay
    cfg_path = runs / f"{plan.run}.yaml"
    write_if_changed(cfg_path, text)
    if rd.is_finished():
        on_event({"event": "train_skip", **base_event})
        return {"status": "ok", "trained": False}
    resume = rd.config.exists()
    cmd = [python, "-m", "adaptlab", "train", "--quiet"]
    cmd += ["--resume", str(run_dir)] if resume else ["--config", str(cfg_path), "--out", str(run_dir)]
    log = runs / f"{plan.run}.log"
    on_event(
        {
            "event": "train_start",
            "resume": resume,
            "steps": config.train.total_steps(),
            "lr": plan.lr,
            **base_event,
        }
    )
    start = time.perf_counter()
    offset = 0
    with log.open("a") as err:
        proc = start_child(cmd, stderr=err, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        try:
            while True:
                done = proc.poll() is not None
                offset = _stream_metrics(rd.metrics, offset, lambda row: on_event({**row, **base_event}))
                if done:
                    break
                time.sleep(1.0)
        except BaseException:
            stop_child(proc)
            raise
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not rd.is_finished():
        error = _last_line(log)
        on_event({"event": "train_failed", "error": error, "log": str(log), **base_event})
        return {"status": "failed", "error": error, "log": str(log), "trained": True}
    on_event({"event": "train_done", "wall_s": wall, **base_event})
    return {"status": "ok", "trained": True}


def _has_outputs(run_dir: Path) -> bool:
    return any(p for pattern in outputs.RUN_OUTPUTS for p in run_dir.glob(pattern))


# A child must not outlive the comparison that started it: it runs in its own process group (so a
# stop reaches everything it started) and the kernel kills it when its parent dies (PR_SET_PDEATHSIG),
# even when the parent is killed with SIGKILL and runs no cleanup of its own.
_PR_SET_PDEATHSIG = 1


def _libc() -> Any:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)  # the C library this process already runs on
    except OSError:
        return None


def _child_setup(parent: int, libc: Any) -> Callable[[], None]:
    """What the child runs between fork and exec (nothing here may allocate much or import)."""

    def setup() -> None:
        os.setpgid(0, 0)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def start_child(cmd: list[str], stderr: Any, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a child process that stops when this process dies, in a process group of its own."""
    libc = _libc() if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env=env,
        preexec_fn=_child_setup(os.getpid(), libc),  # noqa: PLW1509 (the child needs both calls)
    )


def stop_child(proc: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not exited after grace_s."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
            return


def _stream_metrics(path: Path, offset: int, emit: Callable[[dict[str, Any]], None]) -> int:
    """Emit rows appended to metrics.jsonl since `offset`; returns the new offset."""
    try:
        size = path.stat().st_size
    except OSError:
        return offset
    if size < offset:  # truncated by a resume
        offset = 0
    if size == offset:
        return offset
    with path.open() as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    for line in complete.splitlines():
        if line.strip():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                emit({"event": "val" if "val_loss" in row else "step", **row})
    return offset + len(complete.encode())
