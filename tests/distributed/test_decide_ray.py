"""`adaptlab decide --executor ray` (a local Ray cluster): the same decision machinery with the runs as
Ray tasks; a second invocation trains nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_corpus

pytestmark = pytest.mark.distributed


@pytest.fixture()
def ray_shutdown():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_decide_on_ray(run_cli, tmp_path: Path, ray_shutdown) -> None:
    corpus = write_corpus(tmp_path / "data", n_docs=30)
    out = tmp_path / "decision"
    args = ["decide", "--model", "tiny-random", "--data", corpus, "--time", "100s", "--seq-len", "32"]
    args += ["--eval-docs", "4", "--lr-candidates", "2", "--seeds", "1", "--budgets", "1", "--out", out]
    args += ["--executor", "ray", "--cpus-per-run", "1", "--no-calibration"]
    code, text, err = run_cli(*args)
    assert code == 0, err
    d = json.loads((out / "decision.json").read_text())
    assert d["pick"] in ("full", "lora")
    runs = sorted(p.parent.name for p in (out / "compare" / "runs").glob("*/summary.json"))
    assert len(runs) == d["design"]["runs"]
    code, _, err = run_cli(*args)
    assert code == 0 and err.count("finished earlier, skipped") >= len(runs), err
