"""`adaptlab train --nproc N`: N local ranks started with torchrun's own launcher, and one line for the
user when a rank fails.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from adaptlab.distributed.world import LAUNCHED_ENV
from adaptlab.errors import UserError


class RunStopped(Exception):
    """A process of a run launched with --nproc stopped it; `code` is the exit status to return."""

    def __init__(self, message: str | None, code: int) -> None:
        super().__init__(message or "")
        self.message = message
        self.code = code


def launch(nproc: int, argv: list[str], run_dir: str | None) -> str | None:
    """Run `adaptlab train ARGV` on `nproc` local processes, as `torchrun --standalone` would.

    Uses torchrun's own launcher (torch.distributed.launcher), which stops every rank when one fails.
    A rank that exits with a user error has printed its line already (RunStopped code 2); a rank killed
    by a signal or crashing becomes one line naming it (RunStopped code 1). A rank that died after rank 0
    wrote RUN/summary.json (during this launch) stopped nothing: the run is complete, and the line naming
    that rank is returned, not raised (None when every rank exited cleanly).
    """
    import logging
    import time

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {nproc})")
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # what `torchrun --standalone` sets up: a rendezvous on a free local port
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--rdzv-id", str(uuid.uuid4())]
    args = parse_args([*rdzv, "--nproc-per-node", str(nproc), "-m", "adaptlab", "train", *argv])
    config, cmd, cmd_args = config_from_args(args)
    os.environ[LAUNCHED_ENV] = "1"  # the ranks inherit it: a rank that loses a peer stays quiet
    started = time.time()
    try:
        elastic_launch(config, cmd)(*cmd_args)
    except ChildFailedError as err:
        finished = run_dir is not None and _written_since(Path(run_dir) / "summary.json", started)
        message, code = _failure_line(err, run_dir, finished)
        if code == 0:
            return message
        raise RunStopped(message, code) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
    return None


def _written_since(path: Path, since: float) -> bool:
    """Whether path exists and was last written at or after `since` (a time.time())."""
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _failure_line(err: Any, run_dir: str | None, finished: bool = False) -> tuple[str | None, int]:
    """What the launcher says of failed ranks, and its exit status; `finished`: this launch's run wrote
    its summary.json, so a rank that died stopped nothing (status 0)."""
    failures = sorted(err.failures.items(), key=lambda kv: kv[1].timestamp)
    if all(f.exitcode == 2 for _, f in failures):
        return None, 2  # a user error: rank 0 printed it
    rank, first = next(((r, f) for r, f in failures if f.exitcode != 2), failures[0])
    how = (
        f"was killed by {first.signal_name()}"
        if first.exitcode < 0
        else f"exited with status {first.exitcode}"
    )
    where = run_dir or "RUN"
    if finished:
        return (
            f"rank {rank} {how} after the run finished: {where}/summary.json and its artifact are complete",
            0,
        )
    return (
        f"rank {rank} {how}: the run stopped on every rank; the last good checkpoint is kept: "
        f"continue with `adaptlab train --resume {where}`",
        1,
    )
