"""A run whose step times vary far more than a quiet machine's is flagged in summary.json."""

from __future__ import annotations

import json

from helpers import tiny_config, write_corpus

from adaptlab.hardware import NOISY_CV, step_time_spread
from adaptlab.train import train


def test_steady_step_times_are_not_flagged_and_erratic_ones_are() -> None:
    steady = step_time_spread([5000.0, 1000.0, 1010.0, 990.0, 1005.0, 995.0])  # first step: warm-up
    assert steady["noisy"] is False and steady["cv"] < 0.05
    erratic = step_time_spread([1000.0, 1000.0, 300.0, 1000.0, 250.0, 1000.0, 990.0])
    assert erratic["noisy"] is True and erratic["cv"] > NOISY_CV
    assert erratic["slowest_over_median"] > 3
    assert step_time_spread([1000.0, 1000.0])["noisy"] is False  # too few steps to tell


def test_summary_records_the_spread_of_step_times(tmp_path) -> None:
    data = write_corpus(tmp_path / "data", n_docs=8)
    train(tiny_config(data, tmp_path / "run", steps=5))
    st = json.loads((tmp_path / "run" / "summary.json").read_text())["step_time"]
    assert st["steps"] == 4 and isinstance(st["noisy"], bool) and st["cv"] >= 0
