"""Where a comparison's training runs execute: here, one or K at a time, or as Ray tasks on a cluster.

Every executor trains each run with the same `child.train_run` (a child `adaptlab train` process
writing OUT/runs/<run>/), so run directories, skips, resumes, results and reports do not depend on
the executor. `local` runs one run at a time, or K at once with `parallel_runs` (one device each on a
machine with K GPUs). `ray` submits each run as a Ray task with its resources (`gpus_per_run`,
`cpus_per_run`) to the cluster `ray.init(address=...)` reaches, or to a local one it starts; the run
directories must then be on a filesystem every node sees. Progress events come back through a Ray
queue. Evaluation and the report stay on the driver.

    adaptlab compare --model tiny-random --study methods --tokens 4000 --executor ray --cpus-per-run 1 --out c
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adaptlab.compare.child import Executor, Job, OnEvent, locked_events, train_run
from adaptlab.errors import UserError

EXECUTORS = ("local", "ray", "inline")
PROBE_TIMEOUT_S = 5.0


class LocalExecutor:
    """Runs on this machine: one at a time, or `parallel_runs` at once (one GPU each where there are GPUs)."""

    def __init__(self, parallel_runs: int = 1) -> None:
        if parallel_runs < 1:
            raise UserError(f"--parallel-runs must be at least 1 (got {parallel_runs})")
        self.parallel_runs = parallel_runs

    def train_runs(
        self, jobs: list[Job], spec: Any, out: Path, on_event: OnEvent
    ) -> dict[str, dict[str, Any]]:

        if self.parallel_runs == 1 or len(jobs) <= 1:
            return {
                j.plan.run: train_run(
                    j.plan, spec, out, j.force, on_event, j.index, j.total, overwrite=j.overwrite
                )
                for j in jobs
            }
        emit = locked_events(on_event)
        slots = _device_slots(self.parallel_runs)
        free = list(range(self.parallel_runs))
        lock = threading.Lock()

        def one(job: Job) -> dict[str, Any]:
            with lock:
                slot = free.pop(0)
            try:
                env = {"CUDA_VISIBLE_DEVICES": slots[slot]} if slots else None
                return train_run(
                    job.plan,
                    spec,
                    out,
                    job.force,
                    emit,
                    job.index,
                    job.total,
                    overwrite=job.overwrite,
                    env=env,
                )
            finally:
                with lock:
                    free.append(slot)

        with ThreadPoolExecutor(self.parallel_runs) as pool:
            results = list(pool.map(one, jobs))
        return {j.plan.run: r for j, r in zip(jobs, results)}


def _device_slots(k: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES values for k concurrent runs: one visible GPU each (none on a CPU machine)."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        return []
    if n < k:
        raise UserError(f"--parallel-runs {k}: this machine has {n} GPU(s); use --parallel-runs {n} or fewer")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",")] if visible else [str(i) for i in range(n)]
    return ids[:k]


def _train_task(job: Job, spec: Any, out: str, queue: Any) -> dict[str, Any]:
    """A run inside a Ray worker: the same train_run, its events put on the driver's queue."""

    return train_run(
        job.plan, spec, Path(out), job.force, queue.put, job.index, job.total, overwrite=job.overwrite
    )


class RayExecutor:
    """Each run is a Ray task with `gpus_per_run` GPUs and `cpus_per_run` CPUs on the connected cluster."""

    def __init__(self, address: str | None = None, gpus_per_run: float = 0, cpus_per_run: float = 1) -> None:
        if gpus_per_run < 0 or cpus_per_run <= 0:
            raise UserError("--gpus-per-run must be >= 0 and --cpus-per-run > 0")
        self.address, self.gpus, self.cpus = address, gpus_per_run, cpus_per_run
        self.ray = connect(address)

    def train_runs(
        self, jobs: list[Job], spec: Any, out: Path, on_event: OnEvent
    ) -> dict[str, dict[str, Any]]:
        if not jobs:
            return {}
        ray = self.ray
        from ray.util.queue import Empty, Queue

        queue = Queue()
        task = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_train_task)
        refs = {task.remote(j, spec, str(Path(out).resolve()), queue): j for j in jobs}
        status: dict[str, dict[str, Any]] = {}

        def drain() -> None:
            while True:
                try:
                    on_event(queue.get(block=False))
                except Empty:
                    return

        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                drain()
                for ref in done:
                    job = refs[ref]
                    status[job.plan.run] = _task_result(ray, ref, job, on_event)
            drain()
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            queue.shutdown()
        return {j.plan.run: status[j.plan.run] for j in jobs}


def _task_result(ray: Any, ref: Any, job: Job, on_event: OnEvent) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except Exception as err:  # the task itself failed (worker lost, bad spec on the node): the run failed
        cause = getattr(err, "cause", None) or err
        error = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else type(cause).__name__
        on_event(
            {
                "event": "train_failed",
                "error": error,
                "log": "ray task",
                "run": job.plan.run,
                "arm": job.plan.arm,
            }
        )
        return {"status": "failed", "error": error, "trained": False}


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address to probe; None for `auto`/`local`, which Ray resolves itself."""
    if address in ("auto", "local"):
        return None
    bare = address.split("://", 1)[-1].rstrip("/")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    return host, int(port)


def probe(address: str) -> None:
    """Fail fast, with one line, when nothing answers at a Ray address (ray.init would wait a long time)."""
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise UserError(
            f"--ray-address {address}: nothing answers there ({err.strerror or err}); start the head with "
            "`ray start --head` on that node, or drop --ray-address to start a local Ray"
        ) from None


def connect(address: str | None) -> Any:
    """ray, initialised: connected to `address`, or a local Ray started for this process."""
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'adaptlab[cluster]'") from None
    if ray.is_initialized():
        return ray
    if address:
        probe(address)
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(f"--ray-address {address}: could not connect ({first})") from None
        return ray
    env = {k: os.environ[k] for k in ("PYTHONPATH", "ADAPTLAB_CACHE", "HF_HOME") if k in os.environ}
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return ray


def make_executor(
    name: str = "local",
    parallel_runs: int = 1,
    ray_address: str | None = None,
    gpus_per_run: float = 0,
    cpus_per_run: float = 1,
) -> Executor:
    """The executor a comparison's flags ask for (connecting to Ray at once, so a bad address fails first)."""
    if name not in EXECUTORS:
        raise UserError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if name == "inline":
        if ray_address or parallel_runs != 1:
            raise UserError(
                "--executor inline trains one run at a time in this process; drop --ray-address/--parallel-runs"
            )
        from adaptlab.compare.inline import InlineExecutor

        return InlineExecutor()
    if name == "local":
        if ray_address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor(parallel_runs)
    if parallel_runs != 1:
        raise UserError("--parallel-runs is for --executor local; with Ray, the cluster's resources decide")
    return RayExecutor(ray_address, gpus_per_run, cpus_per_run)
