"""`adaptlab compare --executor ray` (a local Ray cluster), `--parallel-runs 2` and `--executor inline` give
the results of the default executor, one run at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import write_corpus

pytestmark = pytest.mark.distributed

# numbers of an arm that depend on what was trained, not on when or where (no wall time, no memory)
MEASURED = ("learning", "forgetting", "final_train_loss", "final_val_loss")


def _spec(tmp_path: Path) -> Path:
    data = write_corpus(tmp_path / "data", n_docs=20)
    spec = {
        "model": "tiny-random",
        "data": {"train": [str(data)], "val_frac": 0.1, "test_frac": 0.1},
        "drift": True,
        "tokens": 192,
        "seeds": 1,
        "train": {"batch": 2, "seq_len": 32, "lr": 1e-3, "precision": "fp32", "eval_examples": 2},
        "eval": {
            "max_docs": 2,
            "max_chars": 400,
            "seq_len": 32,
            "batch": 2,
            "drift_prompts": 2,
            "drift_tokens": 4,
        },
        "analysis": {"enabled": False},
        "arms": [{"name": "full", "method": "full"}, {"name": "lora", "method": "lora", "rank": 4}],
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture()
def ray_shutdown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _measured(out: Path) -> dict[str, dict]:
    results = json.loads((out / "results.json").read_text())
    return {a["name"]: {k: a.get(k) for k in MEASURED} | {"status": a["status"]} for a in results["arms"]}


def test_every_executor_gives_the_local_results(run_cli, tmp_path: Path, ray_shutdown) -> None:
    spec = _spec(tmp_path)
    code, _, err = run_cli("compare", "--config", spec, "--out", tmp_path / "local")
    assert code == 0, err
    local = _measured(tmp_path / "local")
    assert {a["status"] for a in local.values()} == {"ok"}
    ray_args = ("--executor", "ray", "--cpus-per-run", "1")
    code, _, err = run_cli("compare", "--config", spec, "--out", tmp_path / "ray", *ray_args)
    assert code == 0, err
    assert _measured(tmp_path / "ray") == local
    for arm in ("full", "lora"):  # the same run directories
        assert (tmp_path / "ray" / "runs" / arm / "summary.json").exists()
    # resumability: a second invocation finds every run finished and trains nothing
    code, _, err = run_cli("compare", "--config", spec, "--out", tmp_path / "ray", *ray_args)
    assert code == 0 and err.count("finished earlier, skipped") == 2, err
    # two runs at once on this machine
    code, _, err = run_cli("compare", "--config", spec, "--out", tmp_path / "two", "--parallel-runs", "2")
    assert code == 0, err
    assert _measured(tmp_path / "two") == local
    # every run in this process, one after another
    code, _, err = run_cli("compare", "--config", spec, "--out", tmp_path / "inline", "--executor", "inline")
    assert code == 0, err
    assert _measured(tmp_path / "inline") == local


def test_ray_address_that_does_not_answer(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    code, _, err = run_cli(
        "compare",
        "--model",
        "tiny-random",
        "--data",
        "python-stdlib",
        "--tokens",
        "1000",
        "--out",
        out,
        "--executor",
        "ray",
        "--ray-address",
        "127.0.0.1:9",
    )
    assert code == 2
    assert err.count("\n") == 1 and "--ray-address 127.0.0.1:9: nothing answers" in err
    assert not out.exists()
