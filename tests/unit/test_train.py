"""The training loop on tiny-random: artifacts other tools load, invariances, resume, parity with peft."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_config, write_corpus
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adaptlab.models import local_dir
from adaptlab.rundir import RunDir, verify_checkpoint
from adaptlab.train import prepare, resume_run, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _base():
    return AutoModelForCausalLM.from_pretrained(str(local_dir("tiny-random")), dtype=torch.float32).eval()


def _ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 49152, (n, t), generator=torch.Generator().manual_seed(1))


def test_lora_run_dir_contract_and_peft_parity(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", method="lora", steps=6, eval_every=3, save_every=3)
    summary = train(cfg)
    run = RunDir(tmp_path / "run")
    for key in (
        "method",
        "base_model",
        "trainable_params",
        "total_params",
        "peak_mem_bytes",
        "wall_s",
        "tokens_per_s",
        "tokens_seen",
        "final_train_loss",
        "final_val_loss",
        "artifact_bytes",
        "versions",
    ):
        assert key in summary, key
    assert json.loads(run.summary.read_text()) == summary
    assert summary["tokens_seen"] == 6 * 2 * 32
    assert set(summary["versions"]) >= {"python", "torch", "transformers", "peft", "adaptlab", "git_sha"}
    rows = run.read_metrics()
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(
        {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes"} <= r.keys() for r in steps
    )
    assert [r["step"] for r in rows if r.get("split") == "val"] == [3, 6]
    assert not run.checkpoints.exists()  # superseded by the finished artifact
    # The adapter loads with plain peft onto the saved base and gives adaptlab's logits.
    setup_model = prepare(
        cfg.model_copy(update={"out": str(tmp_path / "other")})
    ).model  # untrained, same init
    peft_model = PeftModel.from_pretrained(_base(), str(run.adapter)).eval()
    ids = _ids()
    with torch.no_grad():
        tuned = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
        assert torch.allclose(base, _base()(ids).logits, atol=1e-6)  # adapter disabled == base
        assert not torch.allclose(tuned, base, atol=1e-4)  # the adapter does something
        merged = PeftModel.from_pretrained(_base(), str(run.adapter)).merge_and_unload()
        assert (merged(ids).logits - tuned).abs().max() < 1e-4  # merged == unmerged (fp32)
    del setup_model


def test_frozen_base_unchanged_and_every_trainable_param_changed(corpus, tmp_path):
    from adaptlab.train import _loop

    cfg = tiny_config(corpus, tmp_path / "run", method="lora", steps=4)
    setup = prepare(cfg)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    setup.run.root.mkdir(parents=True)
    _loop(setup, resume=False)
    for name, p in setup.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, f"{name}: requires_grad={p.requires_grad} changed={changed}"


def test_full_fine_tuning_writes_hf_model(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "run", method="full", steps=3, lr=1e-3)
    summary = train(cfg)
    assert summary["trainable_params"] == summary["total_params"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "model"))
    base = _base()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.named_parameters()))  # every weight tensor moved


def test_a_steps_time_includes_making_its_data(corpus, tmp_path, monkeypatch):
    """GRPO samples its rollouts in micro_batches: the time a step logs (elapsed_s, tokens_per_s,
    summary train_s) counts it, not only forward, backward and the update."""
    import time

    from adaptlab.objectives.sft import SFTObjective

    make = SFTObjective.micro_batches
    monkeypatch.setattr(SFTObjective, "micro_batches", lambda *a: time.sleep(0.25) or make(*a))
    summary = train(tiny_config(corpus, tmp_path / "r", steps=2))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    assert elapsed[0] >= 0.25 and elapsed[1] - elapsed[0] >= 0.25
    assert summary["train_s"] >= 0.5


def test_batch_times_accum_invariance(corpus, tmp_path):
    a = train(tiny_config(corpus, tmp_path / "a", steps=3, batch=4, grad_accum=1))
    b = train(tiny_config(corpus, tmp_path / "b", steps=3, batch=1, grad_accum=4))
    la = [r["loss"] for r in RunDir(tmp_path / "a").read_metrics() if "loss" in r]
    lb = [r["loss"] for r in RunDir(tmp_path / "b").read_metrics() if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-5)
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_equals_uninterrupted(corpus, tmp_path, method):
    extra = {"dropout": 0.1} if method == "lora" else {}  # dropout makes the RNG state matter
    whole = train(tiny_config(corpus, tmp_path / "whole", method=method, steps=6, save_every=3, **extra))

    def stop_at_5(row):
        if row.get("step") == 5 and "loss" in row:
            raise KeyboardInterrupt

    cut_dir = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, cut_dir, method=method, steps=6, save_every=3, **extra), on_log=stop_at_5)
    assert not (cut_dir / "summary.json").exists()
    assert RunDir(cut_dir).latest_checkpoint().name == "step-3"
    resumed = resume_run(cut_dir)
    assert resumed["final_train_loss"] == whole["final_train_loss"]  # bit-for-bit on CPU
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    assert resumed["tokens_seen"] == whole["tokens_seen"]
    losses = lambda d: [r["loss"] for r in RunDir(d).read_metrics() if "loss" in r]  # noqa: E731
    assert losses(cut_dir) == losses(tmp_path / "whole")
    art = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "whole" / art)), load_file(str(cut_dir / art))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_config_yaml_reproduces_the_run(corpus, tmp_path, run_cli):
    first = train(tiny_config(corpus, tmp_path / "first", steps=3))
    code, out, err = run_cli(
        "train", "--config", tmp_path / "first" / "config.yaml", "--out", tmp_path / "again", "--quiet"
    )
    assert code == 0, err
    again = json.loads(out)
    assert again["final_train_loss"] == first["final_train_loss"]


def test_nan_loss_stops_with_one_line_and_keeps_last_checkpoint(corpus, tmp_path, run_cli):
    run = RunDir(tmp_path / "run")

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, run.root, method="full", steps=6, save_every=1), on_log=stop_at_3)
    # From step 2 at lr 1e32: step 3 is computed on good weights, its update makes step 4 non-finite.
    code, out, err = run_cli("train", "--resume", run.root, "--lr", "1e32", "--quiet")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged at step 4" in errors[0] and "Traceback" not in err
    assert "kept checkpoint step-2" in errors[0] and "--precision" not in errors[0]  # fp32 already
    assert not (run.root / "summary.json").exists()
    assert [p.name for p in run.checkpoint_dirs()] == ["step-2"]  # step-3 held the weights that diverged
    assert verify_checkpoint(run.checkpoints / "step-2") is None
    assert json.loads((run.checkpoints / "step-2" / "state.json").read_text())["step"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the inherited peak is a Linux rusage trait")
def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """A compare arm runs as a child process: its peak must not include the parent's peak."""
    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))  # touch every page: 1.5 GiB resident
    code = "from adaptlab.hardware import peak_rss_bytes; print(peak_rss_bytes())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    del ballast
    child_peak = int(done.stdout.strip().splitlines()[-1])
    assert 10 * 2**20 < child_peak < 1024 * 2**20  # imports torch (a few hundred MB), not 1.5 GiB
