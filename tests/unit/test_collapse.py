"""Collapse and divergence on tiny-random: the run stops, keeps its last good checkpoint, says what to do."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import tiny_config, write_corpus

from adaptlab.health import COLLAPSE_STEPS, Health, TrainingCollapsed, advice
from adaptlab.rundir import RunDir, verify_checkpoint
from adaptlab.train import resume_run, train

VOCAB = 49152  # tiny-random's vocabulary: uniform output is ln 49152 = 10.8027 nats


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def test_a_random_init_at_the_uniform_level_is_not_a_collapse():
    health = Health(VOCAB)
    assert all(health.check(s, 10.795, 2.0) is None for s in range(1, 10))


def test_a_random_model_wandering_near_the_uniform_level_is_not_a_collapse():
    health = Health(VOCAB)
    assert health.check(1, 10.55, 1.0) is None  # 0.25 nats below uniform: noise, not learning
    assert all(health.check(s, 10.8069, 0.7) is None for s in range(2, 2 + 2 * COLLAPSE_STEPS))


def test_uniform_loss_after_learning_collapses_after_several_steps():
    health = Health(VOCAB)
    assert health.check(1, 3.0, 1.0) is None
    steps = [health.check(s, 10.8027, 0.5) for s in range(2, 2 + COLLAPSE_STEPS)]
    assert steps[:-1] == [None] * (COLLAPSE_STEPS - 1)
    assert isinstance(steps[-1], TrainingCollapsed) and health.bad_from() == 1


def test_a_zero_gradient_streak_collapses_but_a_single_one_does_not():
    health = Health(VOCAB)
    assert [health.check(s, 5.0, g) for s, g in [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0)]] == [None] * 4
    assert isinstance(health.check(5, 5.0, 0.0), TrainingCollapsed)
    assert health.check(6, 0.0, 0.0, labels=0) is None  # no label token: nothing to learn from


def test_advice_names_fp32_only_for_a_run_that_is_not_fp32():
    assert "fp32" not in advice("RUN", 1e6, "fp32") and "--resume RUN --lr 1e+05" in advice(
        "RUN", 1e6, "fp32"
    )
    assert "--precision fp32" in advice("RUN", 1e6, "bf16")


def test_collapsed_run_stops_with_one_line_and_advice_fitting_its_flags(corpus, tmp_path, run_cli):
    """lr 1e6 on full fine-tuning: loss at ln(vocab), grad norm 0; it used to exit 0 and delete checkpoints."""
    out = tmp_path / "run"
    args = ["--model", "tiny-random", "--method", "full", "--data", corpus, "--steps", "8", "--batch", "2"]
    code, _, err = run_cli(
        "train", *args, "--seq-len", "32", "--lr", "1e6", "--save-every", "1", "--precision", "fp32",
        "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "collapsed" in errors[0] and f"--resume {out} --lr 1e+05" in errors[0]
    assert "fp32" not in errors[0]  # the run is fp32 already
    assert not (out / "summary.json").exists()
    # Weights were bad from the first update on: no checkpoint holds good ones, none is left.
    assert RunDir(out).checkpoint_dirs() == []
    # The advised command runs: a resume with no checkpoint starts again at the new peak LR.
    code, stdout, err = run_cli("train", "--resume", out, "--lr", "1e-3", "--quiet")
    assert code == 0, err
    assert json.loads(stdout)["lr"] == 1e-3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 1e-3


def test_collapse_keeps_the_last_good_checkpoint_and_a_resume_with_new_lr_reproduces(
    corpus, tmp_path, run_cli
):
    run = RunDir(tmp_path / "run")
    config = tiny_config(corpus, run.root, method="full", steps=8, save_every=1)

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, on_log=stop_at_3)
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2", "step-1"]
    # From step 2 at lr 1e6: step 3 is still healthy, its update collapses the model.
    with pytest.raises(TrainingCollapsed, match="kept checkpoint step-2"):
        resume_run(run.root, lr=1e6)
    assert [p.name for p in run.checkpoint_dirs()][0] == "step-2"
    assert verify_checkpoint(run.checkpoints / "step-2") is None
    # Resume from it at a lower peak LR; config.yaml records the change and replays the same run.
    code, out, err = run_cli("train", "--resume", run.root, "--lr", "5e-4", "--quiet")
    assert code == 0, err
    resumed = json.loads(out)
    assert resumed["lr_changes"] == [{"step": 2, "lr": 5e-4}]
    code, out, err = run_cli("train", "--config", run.config, "--out", tmp_path / "replay", "--quiet")
    assert code == 0, err
    replay = json.loads(out)
    assert replay["final_train_loss"] == resumed["final_train_loss"]
    losses = lambda d: [r["loss"] for r in RunDir(d).read_metrics() if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "replay") == losses(run.root)
    assert [r["lr"] for r in RunDir(tmp_path / "replay").read_metrics() if "lr" in r][2] < 5e-4


def test_resume_still_refuses_flags_a_checkpoint_depends_on(corpus, tmp_path, run_cli):
    train(tiny_config(corpus, tmp_path / "run", steps=2))
    (tmp_path / "run" / "summary.json").unlink()
    code, _, err = run_cli("train", "--resume", tmp_path / "run", "--steps", "3", "--lr", "1e-4")
    assert code == 2 and "only --lr may change: drop --steps" in err


def test_config_yaml_names_lr_changes_only_when_there_are_some(tmp_path):
    """Older runs' config.yaml has no lr_changes; compare reads a difference as a changed config."""
    config = tiny_config(tmp_path / "data.jsonl", tmp_path / "run")
    assert "lr_changes" not in yaml.safe_load(config.to_yaml())["train"]
    config.train.lr_changes = [{"step": 2, "lr": 1e-4}]
    assert yaml.safe_load(config.to_yaml())["train"]["lr_changes"] == [{"step": 2, "lr": 1e-4}]


def test_an_interrupted_train_says_how_to_resume_it():
    from adaptlab.cli import _resume_hint

    assert _resume_hint(["train", "--model", "m", "--out", "runs/a"]).endswith(
        "`adaptlab train --resume runs/a`"
    )
    assert _resume_hint(["train", "--out=runs/b"]).endswith("--resume runs/b`")
    assert _resume_hint(["train", "--resume", "runs/c", "--lr", "1e-4"]).endswith("--resume runs/c`")
    assert _resume_hint(["compare", "--out", "x"]) == "" and _resume_hint(["train"]) == ""


def test_a_resumed_run_says_where_it_picks_up(corpus, tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, run.root, steps=4, save_every=1), on_log=_stop_at(2))
    with caplog.at_level("WARNING", logger="adaptlab.checkpoint"):
        resume_run(run.root)
    assert f"resuming {run.root} from step-1" in caplog.text  # step 2 stopped before its checkpoint


def _stop_at(step):
    def stop(row):
        if row.get("step") == step and "loss" in row:
            raise KeyboardInterrupt

    return stop
