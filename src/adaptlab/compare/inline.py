"""An executor that trains a comparison's runs in this process, one after another.

For tiny models (tests, smoke runs) the start-up of a child `adaptlab train` (importing torch,
transformers and peft) costs more than the training; here it is paid once. The run directories are
the same as the local executor's (a finished run is skipped, an interrupted one resumed, one whose
config changed retrained), but the runs share one process, so their peak-memory figures are not
separate and a crash of one run stops the comparison. Use `local` for real comparisons.

    compare(spec, out, executor=InlineExecutor())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from adaptlab import outputs
from adaptlab.compare.child import Job, OnEvent
from adaptlab.config import build_config
from adaptlab.errors import UserError
from adaptlab.rundir import RunDir


class InlineExecutor:
    """Train every job in this process, in order."""

    def train_runs(
        self, jobs: list[Job], spec: Any, out: Path, on_event: OnEvent
    ) -> dict[str, dict[str, Any]]:
        return {job.plan.run: self._one(job, spec, out, on_event) for job in jobs}

    @staticmethod
    def _one(job: Job, spec: Any, out: Path, on_event: OnEvent) -> dict[str, Any]:
        from adaptlab.train import resume_run, train

        plan = job.plan
        run_dir = out / "runs" / plan.run
        outputs.claim(run_dir, "run", overwrite=job.overwrite)
        config = build_config(plan.run_config(spec, str(run_dir)))
        rd = RunDir(run_dir)
        event = {"run": plan.run, "arm": plan.arm, "index": job.index, "total": job.total}
        stale = rd.config.exists() and yaml.safe_load(rd.config.read_text()) != yaml.safe_load(
            config.to_yaml()
        )
        if job.force or stale:
            outputs.clear(run_dir)
        if rd.is_finished():
            on_event({"event": "train_skip", **event})
            return {"status": "ok", "trained": False}
        resume = rd.config.exists()
        on_event(
            {
                "event": "train_start",
                "resume": resume,
                "steps": config.train.total_steps(),
                "lr": plan.lr,
                **event,
            }
        )
        try:
            summary = resume_run(run_dir) if resume else train(config, overwrite=True)
        except UserError as err:
            on_event({"event": "train_failed", "error": str(err), "log": "", **event})
            return {"status": "failed", "error": str(err), "trained": True}
        on_event({"event": "train_done", "wall_s": summary["wall_s"], **event})
        return {"status": "ok", "trained": True}
