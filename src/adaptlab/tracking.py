"""Experiment trackers: a run's metrics, config and summary in TensorBoard, MLflow or W&B.

Every tracker gets the rows metrics.jsonl gets (each numeric field a metric at the row's `step`;
an eval row's fields other than `<split>_...` are named `<split>_<field>`), the resolved
config.yaml flattened into hyperparameters (`train.lr`, `method.rank`, ...) and the numeric fields
of summary.json as final metrics (`summary/<field>`). Trackers are optional extras
(`pip install 'adaptlab[tracking]'`), used only through their own libraries:

    --report-to tensorboard          RUN/tensorboard/ (a comparison: OUT/tensorboard/<run>/)
    --report-to tensorboard=DIR      DIR/<run>/
    --report-to mlflow               $MLFLOW_TRACKING_URI, else a local file store ./mlruns
    --report-to mlflow=URI           file:/path, http(s)://host:port, ...
    --report-to wandb                offline (RUN/wandb/; `wandb sync` uploads it later);
                                     WANDB_MODE=online sends it at once

A comparison becomes one run per training run, grouped under the comparison: an MLflow parent
run, a W&B group, TensorBoard subdirectories; the report goes with it as an artifact.

    adaptlab train --model tiny-random --method lora --data python-stdlib --steps 5 \\
        --out runs/lora --report-to tensorboard,mlflow
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml

from adaptlab.errors import UserError

KINDS = ("tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL = {
    "tensorboard": "pip install tensorboard",
    "mlflow": "pip install mlflow-skinny",
    "wandb": "pip install wandb",
}
EXTRAS = {"tensorboard": "tracking", "mlflow": "tracking", "wandb": "wandb"}
"""The adaptlab extra (pyproject.toml) that installs each tracker."""
PROBE_TIMEOUT_S = 3.0
ROW_KEYS_SKIPPED = ("step", "split")
EXPERIMENT = "adaptlab"


@dataclass(frozen=True)
class Target:
    """One `--report-to` entry: a tracker kind and, optionally, where it writes (a dir or a URI)."""

    kind: str
    uri: str | None = None


# ----------------------------------------------------------------------------------------------
# parse and check, before any training starts


def parse_report_to(values: Sequence[str]) -> list[Target]:
    """`--report-to` values (repeatable, each a comma list of `kind` or `kind=URI`) as Targets."""
    targets: list[Target] = []
    for value in values:
        for item in (v.strip() for v in value.split(",")):
            if not item:
                raise UserError(
                    f"--report-to {value!r}: empty tracker name; choose from {', '.join(KINDS)} "
                    "(a comma list, optionally KIND=URI)"
                )
            kind, _, uri = item.partition("=")
            kind = kind.strip().lower()
            if kind not in KINDS:
                raise UserError(f"--report-to {item!r}: choose from {', '.join(KINDS)} (optionally KIND=URI)")
            if any(t.kind == kind for t in targets):
                raise UserError(f"--report-to names {kind} twice: give it once")
            targets.append(Target(kind, uri.strip() or None))
    return targets


def check_targets(targets: Sequence[Target]) -> None:
    """Raise UserError (one line) when a tracker is not installed or its URI does not answer."""
    for t in targets:
        if importlib.util.find_spec(PACKAGES[t.kind]) is None:
            raise UserError(
                f"--report-to {t.kind}: the {PACKAGES[t.kind]} package is not installed: run "
                f"`{INSTALL[t.kind]}` (or `pip install 'adaptlab[{EXTRAS[t.kind]}]'`)"
            )
        if t.kind == "mlflow":
            _check_url(mlflow_uri(t), "--report-to mlflow: tracking server")
        elif t.kind == "tensorboard" and t.uri and Path(t.uri).exists() and not Path(t.uri).is_dir():
            raise UserError(f"--report-to tensorboard={t.uri}: that is a file; give a directory")
        elif t.kind == "wandb" and _wandb_mode() == "online":
            _check_url(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), "--report-to wandb: server")


def _check_url(uri: str, what: str) -> None:
    """A http(s) URI must accept a connection within PROBE_TIMEOUT_S; other schemes are local."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https"):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        raise UserError(
            f"{what} {uri} does not answer: start it or fix the URI (nothing was trained)"
        ) from None


def mlflow_uri(t: Target) -> str:
    """The MLflow tracking URI: the target's, else $MLFLOW_TRACKING_URI, else ./mlruns (a file store)."""
    uri = t.uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def _wandb_mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


# ----------------------------------------------------------------------------------------------
# what a tracker receives


def metric_items(row: dict[str, Any]) -> list[tuple[str, float]]:
    """(name, value) for every numeric field of a metrics.jsonl row except its step."""
    split = row.get("split")
    out = []
    for key, value in row.items():
        if key in ROW_KEYS_SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        name = key if not split or key.startswith(f"{split}_") else f"{split}_{key}"
        out.append((name, float(value)))
    return out


def flatten(data: Any, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as {"section.field": value}; lists and None as text."""
    if isinstance(data, dict):
        out: dict[str, str | int | float | bool] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    if isinstance(data, (bool, int, float, str)):
        return {key: data}
    return {key: json.dumps(data)}


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """summary.json's numeric top-level fields as `summary/<field>`."""
    return {
        f"summary/{k}": float(v)
        for k, v in summary.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def read_config(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    from adaptlab.rundir import RunDir

    return RunDir(run_dir).read_metrics()


def read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------
# trackers


class Tracker(Protocol):
    """One run in one tracker."""

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_row(self, row: dict[str, Any]) -> None: ...
    def log_final(self, metrics: dict[str, float], artifacts: Sequence[Path]) -> None: ...
    def close(self, ok: bool) -> None: ...


@dataclass
class Group:
    """Where a run belongs: a comparison (its name and folder) or nothing."""

    name: str | None = None
    root: Path | None = None
    mlflow_parent: str | None = None


class TensorBoardTracker:
    """Event files in DIR/<run> (torch's SummaryWriter, which writes TensorBoard's own format)."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("events.out.tfevents.*"):  # a replay writes the whole history again
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = params
        text = "\n".join(f"    {k}: {v}" for k, v in params.items())
        self.writer.add_text("config", text)

    def log_row(self, row: dict[str, Any]) -> None:
        for name, value in metric_items(row):
            self.writer.add_scalar(name, value, int(row.get("step", 0)))

    def log_final(self, metrics: dict[str, float], artifacts: Sequence[Path]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for name, value in metrics.items():
            self.writer.add_scalar(name, value, 0)
        for summary in hparams(self.params, metrics):
            self.writer.file_writer.add_summary(summary)
        for path in artifacts:
            if path.suffix == ".md" and path.exists():
                self.writer.add_text(path.stem, path.read_text())

    def close(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run through MlflowClient (a child of the comparison's parent run when grouped)."""

    def __init__(self, uri: str, name: str, tags: dict[str, str]) -> None:
        self.client = mlflow_client(uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        run = self.client.create_run(experiment_id(self.client, experiment), run_name=name, tags=tags)
        self.run_id: str = run.info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_row(self, row: dict[str, Any]) -> None:
        self._metrics(metric_items(row), int(row.get("step", 0)))

    def _metrics(self, items: Iterable[tuple[str, float]], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in items]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_final(self, metrics: dict[str, float], artifacts: Sequence[Path]) -> None:
        self._metrics(metrics.items(), 0)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


def mlflow_client(uri: str) -> Any:
    """MlflowClient for `uri`; a local file store is allowed (mlflow-skinny has no SQL store)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


class WandbTracker:
    """A W&B run (offline unless WANDB_MODE=online), grouped under the comparison when there is one."""

    def __init__(self, root: Path, name: str, group: str | None) -> None:
        import wandb

        root.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", EXPERIMENT),
            name=name,
            group=group,
            dir=str(root),
            mode=_wandb_mode(),  # type: ignore[arg-type]
            reinit="create_new",
        )

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_row(self, row: dict[str, Any]) -> None:
        self.run.log(dict(metric_items(row)), step=int(row.get("step", 0)))

    def log_final(self, metrics: dict[str, float], artifacts: Sequence[Path]) -> None:
        self.run.summary.update(metrics)
        existing = [p for p in artifacts if p.exists()]
        if existing:
            art = self.wandb.Artifact(f"{self.run.name}-report".replace("/", "-"), type="report")
            for p in existing:
                art.add_file(str(p))
            self.run.log_artifact(art)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def tensorboard_dir(t: Target, run_dir: Path, name: str, group: Group) -> Path:
    """DIR/[comparison/]run with a URI; else OUT/tensorboard/run in a comparison, RUN/tensorboard alone."""
    if t.uri:
        return Path(t.uri) / (group.name or "") / name
    if group.root is not None:
        return group.root / "tensorboard" / name
    return run_dir / "tensorboard"


def open_tracker(t: Target, run_dir: Path, name: str, group: Group) -> Tracker:
    """A tracker for one run `name` whose files are in run_dir, inside `group` when it has a name."""
    if t.kind == "tensorboard":
        return TensorBoardTracker(tensorboard_dir(t, run_dir, name, group))
    if t.kind == "mlflow":
        tags = {"adaptlab.run_dir": str(run_dir.resolve())}
        if group.mlflow_parent:
            tags["mlflow.parentRunId"] = group.mlflow_parent
        return MlflowTracker(mlflow_uri(t), name, tags)
    return WandbTracker(group.root or run_dir, name, group.name)


# ----------------------------------------------------------------------------------------------
# a run, live (train) or from its files (compare)


class RunReporter:
    """Sends a training run to every target as it writes metrics.jsonl.

    `wrap(on_log)` gives the callback the loop calls after each row is appended: the first call
    replays metrics.jsonl as it is then (so a resumed run's earlier rows come too), later calls send
    their row. `finish(summary)` sends the summary as final metrics and closes every tracker.
    """

    def __init__(self, targets: Sequence[Target], run_dir: str | Path, name: str | None = None) -> None:
        self.targets = list(targets)
        self.run_dir = Path(run_dir)
        self.name = name or self.run_dir.resolve().name
        self.trackers: list[Tracker] = []
        self.started = False

    def wrap(self, on_log: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
        def hook(row: dict[str, Any]) -> None:
            self.log(row)
            if on_log is not None:
                on_log(row)

        return hook

    def log(self, row: dict[str, Any]) -> None:
        if not self.targets:
            return
        if not self.started:
            self._start()
            for old in read_rows(self.run_dir):
                self._each(lambda tr, r=old: tr.log_row(r))
            return
        self._each(lambda tr: tr.log_row(row))

    def _start(self, group: Group | None = None) -> None:
        self.started = True
        self.trackers = [open_tracker(t, self.run_dir, self.name, group or Group()) for t in self.targets]
        params = flatten(read_config(self.run_dir))
        self._each(lambda tr: tr.log_params(params))

    def _each(self, fn: Callable[[Tracker], None]) -> None:
        for tr in self.trackers:
            fn(tr)

    def abort(self) -> None:
        """Close the trackers of a run that stopped with an error (marked failed where the tracker can)."""
        self._each(lambda tr: tr.close(False))
        self.trackers = []

    def finish(self, summary: dict[str, Any] | None, artifacts: Sequence[Path] = (), ok: bool = True) -> None:
        if not self.targets:
            return
        if not self.started:
            self.log({})
        metrics = final_metrics(summary or {})
        self._each(lambda tr: tr.log_final(metrics, artifacts))
        self._each(lambda tr: tr.close(ok))


def report_run(
    targets: Sequence[Target], run_dir: str | Path, name: str | None = None, group: Group | None = None
) -> None:
    """Send a finished (or failed) run directory to every target: rows, config, summary."""
    reporter = RunReporter(targets, run_dir, name)
    if not reporter.targets:
        return
    reporter._start(group)
    for row in read_rows(reporter.run_dir):
        reporter._each(lambda tr, r=row: tr.log_row(r))
    summary = read_summary(reporter.run_dir)
    reporter.finish(summary, ok=bool(summary))


def report_comparison(targets: Sequence[Target], out: str | Path) -> None:
    """Send a comparison: one run per training run, grouped under it, and the report as an artifact."""
    out = Path(out)
    if not targets:
        return
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{out}/results.json is missing or unreadable: nothing to report") from None
    name = out.resolve().name
    group = Group(name=name, root=out)
    parent = _comparison_parent(targets, out, name, results)
    group.mlflow_parent = parent.run_id if parent is not None else None
    for arm in results.get("arms", []):
        for run in arm.get("runs", []):
            report_run(targets, out / run["dir"], name=run["run"], group=group)
    if parent is not None:
        parent.close(True)
    _comparison_summaries(targets, out, name, results)


def report_files(out: Path) -> list[Path]:
    return [p for p in (out / "report.md", out / "report.html", out / "results.json") if p.exists()]


def _comparison_parent(targets: Sequence[Target], out: Path, name: str, results: dict[str, Any]) -> Any:
    """The MLflow parent run of a comparison (its recommendation as a tag, the report as artifacts)."""
    mlflow = next((t for t in targets if t.kind == "mlflow"), None)
    if mlflow is None:
        return None
    summary = str(results.get("recommendation", {}).get("summary", ""))[:5000]
    parent = MlflowTracker(mlflow_uri(mlflow), name, {"adaptlab.comparison": str(out.resolve())})
    parent.client.set_tag(parent.run_id, "recommendation", summary)
    parent.log_params({k: v for k, v in results.items() if isinstance(v, (str, int, float))})
    parent.log_final({}, report_files(out))
    return parent


def _comparison_summaries(targets: Sequence[Target], out: Path, name: str, results: dict[str, Any]) -> None:
    """TensorBoard: the report as text in OUT/tensorboard; W&B: a run of the group holding the report."""
    for t in targets:
        if t.kind == "tensorboard":
            root = Path(t.uri) / name if t.uri else out / "tensorboard"
            tracker: Tracker = TensorBoardTracker(root / "comparison")
        elif t.kind == "wandb":
            tracker = WandbTracker(out, f"{name}-comparison", name)
        else:
            continue
        tracker.log_params({k: v for k, v in results.items() if isinstance(v, (str, int, float))})
        tracker.log_final({}, report_files(out))
        tracker.close(True)
