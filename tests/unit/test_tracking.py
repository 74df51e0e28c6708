"""`--report-to`: a tiny-random run in TensorBoard and MLflow, read back with their own readers."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import write_corpus

from adaptlab.cli import main
from adaptlab.errors import UserError
from adaptlab.tracking import (
    Target,
    check_targets,
    metric_items,
    mlflow_client,
    parse_report_to,
    report_comparison,
)

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def expected_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] as metrics.jsonl holds them."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for name, value in metric_items(row):
            series.setdefault(name, []).append((row["step"], value))
    return series


def tensorboard_series(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_runs(uri: str) -> list:
    client = mlflow_client(uri)
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps])


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tracked")
    data = write_corpus(root / "data", 10)
    run, store = root / "run", root / "mlruns"
    code = main(
        ["train", "--model", "tiny-random", "--method", "lora", "--data", str(data), "--steps", "3"]
        + ["--batch", "2", "--seq-len", "32", "--eval-every", "2", "--precision", "fp32", "--quiet"]
        + ["--out", str(run), "--report-to", f"tensorboard,mlflow={store.as_uri()}"]
    )
    assert code == 0
    return run, store


def test_tensorboard_events_equal_metrics_jsonl(tracked_run):
    run, _ = tracked_run
    expected = expected_series(run)
    got = tensorboard_series(run / "tensorboard")
    assert {"loss", "lr", "grad_norm", "val_loss", "tokens"} <= set(expected)
    for name, points in expected.items():
        # TensorBoard scalars are float32: each value equals the float32 of the logged one
        assert got[name] == [(s, float(np.float32(v))) for s, v in points], name
    assert "summary/tokens_seen" in got


def test_mlflow_run_equals_metrics_jsonl_config_and_summary(tracked_run):
    run, store = tracked_run
    client, runs = mlflow_runs(store.as_uri())
    assert len(runs) == 1
    info = runs[0]
    expected = expected_series(run)
    for name, points in expected.items():
        history = client.get_metric_history(info.info.run_id, name)
        assert [(m.step, m.value) for m in history] == points, name
    summary = json.loads((run / "summary.json").read_text())
    assert info.data.metrics["summary/tokens_seen"] == summary["tokens_seen"]
    assert info.data.params["method.method"] == "lora"
    assert info.data.params["model.name"] == "tiny-random"
    assert info.info.status == "FINISHED"


def test_unanswering_tracker_uri_stops_before_training(tmp_path, capsys):
    code = main(
        ["train", "--model", "tiny-random", "--method", "lora", "--data", "python-stdlib", "--steps", "1"]
        + ["--out", str(tmp_path / "run"), "--report-to", "mlflow=http://127.0.0.1:9"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "does not answer" in err[0] and "127.0.0.1:9" in err[0]
    assert not (tmp_path / "run").exists()


def test_report_to_parses_lists_and_rejects_unknown_and_repeats():
    assert parse_report_to(["tensorboard,mlflow=file:/x", "wandb"]) == [
        Target("tensorboard"),
        Target("mlflow", "file:/x"),
        Target("wandb"),
    ]
    with pytest.raises(UserError, match="choose from tensorboard, mlflow, wandb"):
        parse_report_to(["comet"])
    with pytest.raises(UserError, match="twice"):
        parse_report_to(["mlflow", "mlflow"])


@pytest.mark.parametrize("value", ["", " ", "tensorboard,", "tensorboard,,mlflow"])
def test_an_empty_tracker_name_is_refused(value: str) -> None:
    with pytest.raises(UserError, match=r"empty tracker name; choose from tensorboard, mlflow, wandb"):
        parse_report_to([value])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_tracker_package_names_the_pip_install():
    with pytest.raises(UserError, match=r"pip install wandb") as err:
        check_targets([Target("wandb")])
    extra = str(err.value).split("adaptlab[")[1].split("]")[0]
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert any(dep.startswith("wandb") for dep in extras[extra]), (extra, extras[extra])


def test_eval_rows_keep_their_split_in_metric_names():
    row = {"step": 2, "tokens": 128, "split": "val", "val_loss": 1.5, "note": "x", "ok": True}
    assert metric_items(row) == [("val_tokens", 128.0), ("val_loss", 1.5)]


def _fake_comparison(out: Path) -> None:
    """A finished comparison's files, as `adaptlab compare` writes them (no training needed)."""
    arms = []
    for arm, loss in (("lora", 2.0), ("full", 1.5)):
        run = out / "runs" / arm
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"method:\n  method: {arm}\nmodel:\n  name: tiny-random\n")
        rows = [{"step": s, "tokens": 64 * s, "loss": loss / s} for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"method": arm, "tokens_seen": 128, "wall_s": 3.0}))
        arms.append({"name": arm, "method": arm, "runs": [{"run": arm, "dir": f"runs/{arm}", "seed": 0}]})
    rec = {"pick": "lora", "summary": "Pick lora: it forgot less."}
    (out / "results.json").write_text(json.dumps({"study": "methods", "arms": arms, "recommendation": rec}))
    (out / "report.md").write_text("# Report\n\nPick lora.\n")


def test_comparison_is_grouped_with_its_report(tmp_path):
    out = tmp_path / "cmp"
    _fake_comparison(out)
    store = (tmp_path / "mlruns").as_uri()
    report_comparison([Target("tensorboard"), Target("mlflow", store)], out)

    assert tensorboard_series(out / "tensorboard" / "lora")["loss"] == [(1, 2.0), (2, 1.0)]
    assert tensorboard_series(out / "tensorboard" / "full")["loss"] == [(1, 1.5), (2, 0.75)]
    client, runs = mlflow_runs(store)
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["cmp"]
    assert parent.data.tags["recommendation"] == "Pick lora: it forgot less."
    for arm in ("lora", "full"):
        assert by_name[arm].data.tags["mlflow.parentRunId"] == parent.info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json"} <= artifacts


def test_compare_checks_trackers_before_training(tmp_path, capsys):
    args = ["compare", "--model", "tiny-random", "--data", "python-stdlib", "--out", str(tmp_path / "cmp")]
    assert main([*args, "--report-to", "comet"]) == 2
    assert "choose from tensorboard, mlflow, wandb" in capsys.readouterr().err
    assert main([*args, "--report-to", "tensorboard,mlflow=http://127.0.0.1:9"]) == 2
    assert "does not answer" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
