"""`adaptlab decide`: the design fits --time, the answer follows the intervals, a tiny-random decision
runs end to end in seconds, and a killed decision resumes without training its finished runs again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptlab.decide.answer import _judge
from adaptlab.decide.design import MIN_RUNG_STEPS, Costs, estimate, size
from adaptlab.decide.spec import DecideSpec, parse_duration, parse_tokens
from adaptlab.errors import UserError
from tests.helpers import write_corpus


def _costs(step_s: float = 0.5, start_s: float = 5.0, eval_s: float = 20.0) -> Costs:
    return Costs(
        step_s={"full": step_s, "lora": step_s * 0.7},
        start_s={"full": start_s, "lora": start_s},
        val_s=1.0,
        eval_s={"full": eval_s, "lora": eval_s},
        base_eval_s=eval_s,
        setup_s=10.0,
    )


def _spec(**kw) -> DecideSpec:
    return DecideSpec(model="tiny-random", data=["python-stdlib"], time_s=kw.pop("time_s", 1200.0), **kw)


def test_durations_and_token_counts() -> None:
    assert parse_duration("20m") == 1200 and parse_duration("2h") == 7200 and parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_tokens("50M") == 50_000_000 and parse_tokens("300k") == 300_000 and parse_tokens("2B") == 2e9
    for bad in ("", "0m", "-3m", "20 minutes", "m"):
        with pytest.raises(UserError, match="--time"):
            parse_duration(bad)
    with pytest.raises(UserError, match="--target-tokens"):
        parse_tokens("many")


@pytest.mark.parametrize("time_s", [600.0, 1200.0, 3600.0, 7200.0])
def test_the_design_fits_the_time_it_is_given(time_s: float) -> None:
    costs = _costs()
    d = size(_spec(time_s=time_s), ["full", "lora"], costs)
    assert d.estimate_s <= time_s
    assert d.steps[0] >= MIN_RUNG_STEPS and len(d.budgets) >= 2
    assert d.steps == [d.steps[0] * 2**i for i in range(len(d.steps))]
    assert d.budgets == [s * 4 * 128 for s in d.steps]
    assert d.estimate_s == pytest.approx(
        sum(estimate(costs, d.methods, len(d.lrs["full"]), d.seeds, d.steps, 2)[0].values())
    )
    # one more rung-0 step would not fit (the time goes into the budgets)
    more = [(d.steps[0] + 1) * 2**i for i in range(len(d.steps))]
    assert sum(estimate(costs, d.methods, len(d.lrs["full"]), d.seeds, more, 2)[0].values()) > time_s


def test_more_time_buys_a_richer_design() -> None:
    small = size(_spec(time_s=600.0), ["full", "lora"], _costs())
    large = size(_spec(time_s=4 * 3600.0), ["full", "lora"], _costs())
    assert (len(large.lrs["full"]), large.seeds, len(large.budgets)) >= (
        len(small.lrs["full"]),
        small.seeds,
        len(small.budgets),
    )
    assert large.budgets[-1] > small.budgets[-1]
    assert large.seeds == 3 and len(large.lrs["full"]) == 4 and len(large.budgets) == 3


def test_too_little_time_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match=r"--time 60 s is too short .* needs about"):
        size(_spec(time_s=60.0), ["full", "lora"], _costs())


def test_the_pilot_never_exceeds_the_target_budget() -> None:
    d = size(_spec(time_s=4 * 3600.0, target_tokens=40_000), ["full", "lora"], _costs())
    assert d.budgets[-1] <= 40_000


def test_the_same_relative_lr_grid_for_every_method() -> None:
    d = size(_spec(time_s=4 * 3600.0), ["full", "lora"], _costs())
    full, lora = sorted(d.lrs["full"]), sorted(d.lrs["lora"])
    assert [b / a for a, b in zip(full, lora)] == pytest.approx([10.0] * len(full), rel=0.01)
    assert d.lrs["full"][0] == 2e-5  # the prior reports first


def _d(lo: float, hi: float) -> dict:
    return {"value": (lo + hi) / 2, "ci95": [lo, hi]}


def test_the_answer_reads_intervals_not_point_estimates() -> None:
    margin = 0.01
    assert _judge(_d(-0.005, 0.02), _d(-0.01, 0.01), margin) == "about as good"
    assert _judge(_d(-0.005, 0.02), _d(0.001, 0.01), margin) == "forgets more"
    assert _judge(_d(-0.05, 0.02), _d(0.001, 0.01), margin) == "forgets more"  # learning unclear
    assert _judge(_d(-0.05, -0.02), _d(-0.01, 0.01), margin) == "learns less"
    assert _judge(_d(-0.05, 0.02), _d(-0.01, 0.01), margin) == "cannot tell"  # interval spans the margin
    assert _judge(None, None, margin) == "cannot tell"


def test_the_pick_follows_the_verdicts() -> None:
    from adaptlab.decide.answer import _pick

    spec = _spec()

    def options(learn: dict, forget: dict) -> dict:
        pilot = {"learning": {"value": 0.1}, "forgetting": {"value": 0.01}}
        return {
            "full": {"fits_target": True, "pilot": pilot, "target_peak_mem_bytes": 3e9},
            "lora": {
                "fits_target": True,
                "pilot": {**pilot, "learning": {"value": 0.09}},
                "target_peak_mem_bytes": 1e9,
                "vs_full": {"learning": learn, "forgetting": forget},
            },
        }

    full = {"learning": {"value": 0.1}}
    assert _pick(spec, options(_d(-0.005, 0.02), _d(-0.01, 0.01)), full, {})[0] == "lora"
    pick, why, _ = _pick(spec, options(_d(-0.05, 0.02), _d(0.01, 0.03)), full, {})
    assert pick == "full" and "shown to forget more" in why and "+0.0200 [+0.0100, +0.0300]" in why
    pick, why, _ = _pick(spec, options(_d(-0.05, 0.02), _d(-0.01, 0.01)), full, {})
    assert pick == "full" and why.startswith("not established")  # full learned more by point estimate
    no_full = options(_d(-0.005, 0.02), _d(-0.01, 0.01))
    no_full["full"]["fits_target"] = False
    pick, why, _ = _pick(spec, no_full, full, {})
    assert pick == "lora" and "does not fit" in why


def test_bad_flags_are_one_line(run_cli) -> None:
    code, _, err = run_cli("decide", "--model", "tiny-random", "--data", "python-stdlib", "--time", "soon")
    assert code == 2 and err.count("\n") == 1 and "--time" in err
    code, _, err = run_cli(
        "decide", "--model", "tiny-random", "--data", "python-stdlib", "--time", "20m", "--methods", "full"
    )
    assert code == 2 and err.count("\n") == 1 and "--methods" in err
    code, _, err = run_cli(
        "decide",
        "--model",
        "tiny-random",
        "--data",
        "python-stdlib",
        "--time",
        "20m",
        "--gpus",
        "8",
        "--device",
        "cuda",
        "--dry-run",
    )
    assert code == 2 and "--memory" in err and err.strip().count("\n") <= 1


def test_a_dry_run_prints_the_experiment_and_trains_nothing(run_cli, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "data", n_docs=40)
    out = tmp_path / "decision"
    code, text, err = run_cli(
        "decide",
        "--model",
        "tiny-random",
        "--data",
        corpus,
        "--time",
        "2h",
        "--target-tokens",
        "5M",
        "--gpus",
        "8",
        "--device",
        "cuda",
        "--memory",
        "80GiB",
        "--out",
        out,
        "--dry-run",
    )
    assert code == 0, err
    assert "8 x cuda" in text and "estimated" in text and "LRs" in text
    assert not out.exists()


def _decide(corpus: Path, out: Path, **kw) -> subprocess.Popen:
    args = [sys.executable, "-m", "adaptlab", "decide", "--model", "tiny-random", "--data", str(corpus)]
    args += [
        "--time",
        "100s",
        "--executor",
        "inline",
        "--eval-docs",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    args += ["--lr-candidates", "2", "--seeds", "2", "--budgets", "2", "--no-calibration"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_a_decision_end_to_end_on_tiny_random(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "data", n_docs=40)
    out = tmp_path / "decision"
    proc = _decide(corpus, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    d = json.loads((out / "decision.json").read_text())
    assert d["pick"] in ("full", "lora")
    lora = d["options"]["lora"]
    assert (
        lora["vs_full"]["learning"]["ci95"] is not None and lora["vs_full"]["forgetting"]["ci95"] is not None
    )
    assert lora["pilot"]["seeds"] == 2
    assert set(d["search"]) == {"full", "lora"} and all(len(s["rungs"]) >= 1 for s in d["search"].values())
    assert "# Decision" in stdout and "Use " in stdout
    assert "about" in stderr and "left" in stderr  # the whole decision's ETA
    assert (out / "compare" / "report.md").exists()


def test_a_killed_decision_resumes_without_retraining(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "data", n_docs=40)
    out = tmp_path / "decision"
    proc = _decide(corpus, out, start_new_session=True)
    runs = out / "compare" / "runs"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(runs.glob("*/summary.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/summary.json")}
    assert len(finished) >= 3 and not (out / "decision.json").exists()
    again = _decide(corpus, out)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # none trained again
    assert "finished earlier, skipped" in stderr
    assert json.loads((out / "decision.json").read_text())["pick"] in ("full", "lora")


def test_a_slow_search_buys_fewer_seeds_never_fewer_than_two() -> None:
    from adaptlab.decide.design import seeds_within

    d = size(_spec(time_s=4 * 3600.0), ["full", "lora"], _costs())
    assert d.seeds == 3
    rest = d.breakdown["replicate"] + d.breakdown["evaluation"] + d.breakdown["report"]
    assert seeds_within(d, rest * 1.01, 1.0) == 3
    assert seeds_within(d, rest * 1.01, 1.5) == 2
    assert seeds_within(d, 1.0, 3.0) == 2


def test_a_method_that_does_not_fit_the_target_is_left_out(tmp_path: Path) -> None:
    from adaptlab.decide import prepare
    from adaptlab.plan import plan

    corpus = write_corpus(tmp_path / "data", n_docs=40)
    p = plan("tiny-random", [str(corpus)], seq_len=128, batch=4, ranks=[16])
    full, lora = p["methods"]["full"]["peak_mem_bytes"], p["methods"]["lora"]["peak_mem_bytes"]
    assert lora < full
    between = f"{(full + lora) / 2 / 2**30:.4f}GiB"
    spec = DecideSpec(model="tiny-random", data=[str(corpus)], time_s=3600.0, memory=between)
    target, design, _ = prepare(spec, None, "inline", 1, calibrate=False)
    assert not target.fits("full") and target.fits("lora")
    assert design.methods == ["lora"] and any("full does not fit" in n for n in target.notes)
    tiny = DecideSpec(model="tiny-random", data=[str(corpus)], time_s=3600.0, memory="0.01GiB")
    with pytest.raises(UserError, match="no method fits"):
        prepare(tiny, None, "inline", 1, calibrate=False)
