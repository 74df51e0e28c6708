"""The whole decision's progress: every comparison event passes through, and after each finished
run or evaluation a `decision_progress` event says how much of the decision is done and its ETA
(the design's estimate of what remains, scaled by how the finished part compared with its estimate).

    python -c "from adaptlab.decide.progress import Progress; help(Progress)"
"""

from __future__ import annotations

import time
from typing import Any

from adaptlab.compare.child import OnEvent
from adaptlab.decide.design import Design


class Progress:
    def __init__(self, design: Design, emit: OnEvent, t0: float) -> None:
        b = design.breakdown
        self.emit = emit
        self.t0 = t0
        self.run_s = (b["search"] + b["replicate"]) / max(1, design.runs)
        self.eval_s = b["evaluation"] / max(1, design.evaluations)
        self.total_s = design.estimate_s
        self.runs, self.evaluations = design.runs, design.evaluations
        self.done_runs = self.done_evals = 0
        self.skipped_s = 0.0
        self.reused = False
        self.seen: set[str] = set()  # runs counted (the replication meets the search's runs again)

    def phase(self, text: str) -> None:
        self.emit({"event": "phase", "text": text})

    def __call__(self, e: dict[str, Any]) -> None:
        self.emit(e)
        kind = e.get("event")
        if kind in ("train_done", "train_failed", "train_skip"):
            if e.get("run") in self.seen:
                return
            self.seen.add(e.get("run", ""))
            self.done_runs += 1
            if kind == "train_skip":
                self.reused = True
                self.skipped_s += self.run_s
        elif kind in ("eval_done", "eval_failed"):
            self.done_evals += 1
        else:
            return
        self.emit(self.status())

    def status(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.t0
        done_est = self.done_runs * self.run_s + self.done_evals * self.eval_s - self.skipped_s
        remaining = max(0.0, self.total_s - self.skipped_s - done_est)
        pace = elapsed / done_est if done_est > 1.0 else 1.0
        return {
            "event": "decision_progress",
            "runs_done": self.done_runs,
            "runs": self.runs,
            "evaluations_done": self.done_evals,
            "evaluations": self.evaluations,
            "elapsed_s": elapsed,
            "eta_s": remaining * pace,
        }
