"""One run on two processes (torchrun, gloo on CPU) takes the same steps as one process, and resumes
at any world size. Each run here is `adaptlab train --nproc 2` on tiny-random; the one-process
references run in this process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, train_in_child, write_corpus
from safetensors.torch import load_file

from adaptlab.rundir import RunDir
from adaptlab.train import resume_run, train

pytestmark = pytest.mark.distributed

REL = 1e-5
ARTIFACT = {
    "lora": "adapter/adapter_model.safetensors",
    "dora": "adapter/adapter_model.safetensors",
    "qlora": "adapter/adapter_model.safetensors",
    "full": "model/model.safetensors",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data"), n_docs=12)


def _config(corpus: Path, out: Path, method: str, **train_fields):
    # global batch 4 = batch 2 x accum 2: one process accumulates two micro-batches, two ranks one each
    return tiny_config(corpus, out, method=method, grad_accum=2, **train_fields)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Uninterrupted one-process runs, by method."""
    root = tmp_path_factory.mktemp("ref")
    return {m: train(_config(corpus, root / m, m)) and root / m for m in ARTIFACT}


def _write(config, path: Path) -> Path:
    path.write_text(config.to_yaml())
    return path


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in RunDir(run).read_metrics() if "loss" in r]


def _assert_same_run(a: Path, b: Path, method: str) -> None:
    """Per-step losses within 1e-5 relative and final weights within 1e-5; the same artifact files."""
    la, lb = _losses(a), _losses(b)
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=REL)
    wa, wb = load_file(str(a / ARTIFACT[method])), load_file(str(b / ARTIFACT[method]))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=REL, atol=REL)
    folder = ARTIFACT[method].split("/")[0]
    assert sorted(p.name for p in (a / folder).iterdir()) == sorted(p.name for p in (b / folder).iterdir())


@pytest.mark.parametrize(
    ("method", "parallel"),
    [
        ("lora", "ddp"),
        ("lora", "fsdp"),
        ("full", "ddp"),
        ("full", "fsdp"),
        ("dora", "fsdp"),
        ("qlora", "ddp"),
    ],
)
def test_two_processes_take_the_steps_of_one(corpus, reference, tmp_path, method, parallel):
    out = tmp_path / "two"
    # a sharded checkpoint mid-run too (it must not change the steps)
    cfg = _write(_config(corpus, out, method, save_every=2), tmp_path / "cfg.yaml")
    proc = train_in_child("--config", str(cfg), "--nproc", "2", "--parallel", parallel)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == parallel
    assert json.loads(proc.stdout)["tokens_seen"] == RunDir(reference[method]).read_summary()["tokens_seen"]
    _assert_same_run(reference[method], out, method)


def test_two_processes_at_bf16_take_the_steps_of_one_with_the_base_held_in_bf16(corpus, tmp_path):
    """At bf16 each rank holds LoRA's frozen base in bf16 (adaptlab.frozen_base), which DDP broadcasts
    over gloo like any parameter: the steps are one process's within bf16's rounding."""
    one = tmp_path / "one"
    train(_config(corpus, one, "lora", precision="bf16"))
    out = tmp_path / "two"
    cfg = _write(_config(corpus, out, "lora", precision="bf16"), tmp_path / "cfg.yaml")
    proc = train_in_child("--config", str(cfg), "--nproc", "2", "--parallel", "ddp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"
    assert _losses(out) == pytest.approx(_losses(one), rel=1e-3)
    wa, wb = load_file(str(one / ARTIFACT["lora"])), load_file(str(out / ARTIFACT["lora"]))
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-2, atol=1e-4)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "adaptlab" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _launch(cfg: Path, *args: str) -> subprocess.Popen:
    """`adaptlab train --config CFG --nproc 2 ARGS` started in a child, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "adaptlab", "train", "--config", str(cfg), "--nproc", "2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _kill_rank_1_after_a_checkpoint(cfg: Path, out: Path, *args: str) -> tuple[int, str]:
    """Launch the run on two processes, SIGKILL rank 1 once its first checkpoint is in place; return the
    launcher's exit status and stderr."""
    launcher = _launch(cfg, *args)
    deadline = time.time() + 240
    while RunDir(out).latest_checkpoint() is None and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _rank_pid(launcher, 1)
    assert pid is not None, "rank 1 not found (the run ended before a checkpoint?)"
    os.kill(pid, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    return launcher.returncode, err


def test_killed_rank_stops_the_run_and_it_resumes_at_one_process(corpus, tmp_path):
    steps = 24  # each checkpoint of full fine-tuning takes long enough that the kill lands mid-run
    whole = tmp_path / "whole"
    train(_config(corpus, whole, "full", steps=steps, save_every=2))
    out = tmp_path / "cut"
    cfg = _write(_config(corpus, out, "full", steps=steps, save_every=2), tmp_path / "cfg.yaml")
    code, err = _kill_rank_1_after_a_checkpoint(cfg, out, "--parallel", "fsdp")
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 1, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 was killed by SIGKILL"), err[-2000:]
    assert "--resume" in lines[0]
    assert not (out / "summary.json").exists()
    ckpt = RunDir(out).latest_checkpoint()
    assert ckpt is not None and (ckpt / ".metadata").exists()  # sharded (DCP), written by two ranks
    assert int(ckpt.name.split("-")[1]) < steps
    resume_run(out)  # one process resumes what two wrote
    _assert_same_run(whole, out, "full")


def test_killed_lora_run_resumes_at_one_process_and_at_two(corpus, tmp_path):
    """LoRA's sharded checkpoint holds what trains (no frozen base tensor, not even the head tied to the
    embeddings); a resume puts it over the base it loaded itself, at any world size."""
    import torch.distributed.checkpoint as dcp

    steps = 12
    whole = tmp_path / "whole"
    train(_config(corpus, whole, "lora", steps=steps, save_every=2))
    out = tmp_path / "cut"
    cfg = _write(_config(corpus, out, "lora", steps=steps, save_every=2), tmp_path / "cfg.yaml")
    code, err = _kill_rank_1_after_a_checkpoint(cfg, out)  # DDP, the default on CPU
    assert code == 1 and "error: rank 1 was killed by SIGKILL" in err, err[-2000:]
    ckpt = RunDir(out).latest_checkpoint()
    assert ckpt is not None and (ckpt / ".metadata").exists() and int(ckpt.name.split("-")[1]) < steps
    again = tmp_path / "cut-again"
    shutil.copytree(out, again)
    resume_run(out)  # one process resumes what two wrote
    _assert_same_run(whole, out, "lora")
    saved = [
        k
        for k in dcp.FileSystemReader(str(again / "checkpoints" / ckpt.name))
        .read_metadata()
        .state_dict_metadata
        if k.startswith("model.")
    ]
    assert saved and all(".lora_" in k for k in saved), [k for k in saved if ".lora_" not in k]
    proc = train_in_child("--resume", str(again), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(whole, again, "lora")


def test_rank_killed_after_the_run_finished_stops_nothing(corpus, tmp_path):
    """A rank that dies once summary.json is written (the run is complete) is said, and the launch
    succeeds with the run's summary: there is nothing to resume."""
    import psutil

    out = tmp_path / "run"
    cfg = _write(_config(corpus, out, "lora", save_every=2), tmp_path / "cfg.yaml")
    launcher = _launch(cfg)
    deadline = time.time() + 240
    pid = None
    while not (out / "summary.json").exists() and launcher.poll() is None and time.time() < deadline:
        pid = pid or _rank_pid(launcher, 1)
        time.sleep(0.005)
    assert pid is not None and (out / "summary.json").exists(), launcher.communicate()[1][-2000:]
    # the ranks take seconds to leave the process group and exit after the summary is written
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE, "rank 1 exited before the kill"
    os.kill(pid, signal.SIGKILL)
    stdout, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, err[-2000:]
    assert json.loads(stdout) == json.loads((out / "summary.json").read_text())
    lines = [x for x in err.splitlines() if x.startswith(("warning:", "error:"))]
    assert lines == [
        f"warning: rank 1 was killed by SIGKILL after the run finished: {out}/summary.json and its artifact "
        "are complete"
    ], err[-2000:]
    assert (out / ARTIFACT["lora"]).exists()


def test_stopped_at_one_process_resumes_at_two(corpus, reference, tmp_path):
    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(_config(corpus, out, "lora", save_every=2), on_log=stop_at_3)
    assert RunDir(out).latest_checkpoint().name == "step-2"
    proc = train_in_child("--resume", str(out), "--nproc", "2", "--parallel", "fsdp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same_run(reference["lora"], out, "lora")


# ------------------------------------------------------------------------------------- bad input


def test_world_size_that_does_not_divide_the_global_batch(run_cli, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = _write(_config(corpus, out, "lora"), tmp_path / "cfg.yaml")
    code, _, err = run_cli("train", "--config", cfg, "--nproc", "3")
    assert code == 2 and err.count("\n") == 1
    assert "world size 3 does not divide the global batch 4" in err
    assert not out.exists()


def test_world_size_from_torchrun_env_that_does_not_divide(run_cli, corpus, tmp_path, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--config", _write(_config(corpus, out, "lora"), tmp_path / "c.yaml"))
    assert code == 2 and "world size 3 does not divide" in err and err.count("\n") == 1
    assert not out.exists()


def test_fsdp_refuses_qlora_and_says_what_to_use(run_cli, corpus, tmp_path):
    out = tmp_path / "run"
    cfg = _write(_config(corpus, out, "qlora"), tmp_path / "cfg.yaml")
    code, _, err = run_cli("train", "--config", cfg, "--parallel", "fsdp", "--nproc", "2")
    assert code == 2 and err.count("\n") == 1
    assert "--parallel fsdp cannot train qlora" in err and "use --parallel ddp" in err
    assert not out.exists()


def test_process_group_that_cannot_form(run_cli, corpus, tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(port), "ADAPTLAB_DIST_TIMEOUT": "3"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    code, _, err = run_cli("train", "--config", _write(_config(corpus, out, "lora"), tmp_path / "c.yaml"))
    assert code == 2 and err.count("\n") == 1
    assert "could not join the gloo process group at 127.0.0.1:" in err
    assert not (out / "summary.json").exists() and not out.exists()
