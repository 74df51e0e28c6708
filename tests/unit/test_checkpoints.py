"""Checkpoints on tiny-random: checksums written with them, resume from the newest that verifies."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from helpers import tiny_config, write_corpus

from adaptlab.rundir import RunDir, save_checkpoint, verify_checkpoint
from adaptlab.train import resume_run, train


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    """A full fine-tuning run stopped after step 4 of 5: checkpoints step-2 and step-3, metrics rows 1-4."""
    root = tmp_path_factory.mktemp("cut")
    corpus = write_corpus(root / "corpus")

    def stop_at_4(row):
        if row.get("step") == 4 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, root / "run", method="full", steps=5, save_every=1), on_log=stop_at_4)
    return root / "run"


def _copy(cut_run, tmp_path):
    shutil.copytree(cut_run, tmp_path / "run")
    return RunDir(tmp_path / "run")


def _losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def test_a_checkpoint_carries_the_checksum_of_every_file(cut_run):
    run = RunDir(cut_run)
    assert [p.name for p in run.checkpoint_dirs()] == ["step-3", "step-2"]
    for ckpt in run.checkpoint_dirs():
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
        assert set(files) == {"trainable.safetensors", "optimizer.pt", "state.json"}
        assert verify_checkpoint(ckpt) is None


def test_a_flipped_byte_fails_verification(cut_run, tmp_path):
    run = _copy(cut_run, tmp_path)
    path = run.checkpoints / "step-3" / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert (
        verify_checkpoint(run.checkpoints / "step-3") == "trainable.safetensors does not match its checksum"
    )


def _truncate_weights(ckpt):
    path = ckpt / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_optimizer(ckpt):
    (ckpt / "optimizer.pt").write_bytes(b"")


def _bad_state(ckpt):
    (ckpt / "state.json").write_text("{not json")


def _no_manifest(ckpt):
    (ckpt / "manifest.json").unlink()


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_truncate_weights, "trainable.safetensors has"),
        (_empty_optimizer, "optimizer.pt has 0 bytes"),
        (_bad_state, "state.json has"),
        (_no_manifest, "no manifest.json"),
    ],
)
def test_resume_skips_a_corrupt_newest_checkpoint_and_continues_bit_exact(
    cut_run, tmp_path, caplog, corrupt, reason
):
    run = _copy(cut_run, tmp_path)
    corrupt(run.checkpoints / "step-3")
    with caplog.at_level(logging.WARNING, logger="adaptlab.checkpoint"):
        summary = resume_run(run.root)
    assert f"step-3: {reason}" in caplog.text and "resuming from step-2" in caplog.text
    assert summary["steps"] == 5
    # Steps 3 and 4 ran again from step-2 and gave the losses the first process logged.
    before, after = _losses(RunDir(cut_run)), _losses(run)
    assert [after[s] for s in (1, 2, 3, 4)] == [before[s] for s in (1, 2, 3, 4)]


def test_an_empty_optimizer_file_is_no_abort(cut_run, tmp_path, run_cli):
    """An empty optimizer.pt made torch.load raise EOFError, which click turned into `aborted`, exit 130."""
    run = _copy(cut_run, tmp_path)
    for ckpt in run.checkpoint_dirs():
        _empty_optimizer(ckpt)
    code, out, err = run_cli("train", "--resume", run.root, "--quiet")
    assert code == 0, err
    assert "aborted" not in err and "Traceback" not in err
    assert json.loads(out)["steps"] == 5 and run.is_finished()


def test_unfinished_checkpoint_writes_are_removed_at_resume(cut_run, tmp_path, caplog):
    run = _copy(cut_run, tmp_path)
    stale = run.checkpoints / ".step-4.x1y2z3"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"\0" * 1000)

    def stop_at_start(row):
        raise KeyboardInterrupt  # the first row: the cleanup already ran

    with caplog.at_level(logging.WARNING, logger="adaptlab.checkpoint"), pytest.raises(KeyboardInterrupt):
        resume_run(run.root, on_log=stop_at_start)
    assert not stale.exists()
    assert "removed 1 unfinished checkpoint write" in caplog.text
    assert [p.name for p in run.checkpoint_dirs()] == ["step-3", "step-2"]  # real checkpoints stay


@pytest.fixture
def synced(monkeypatch):
    """The inodes os.fsync flushes (the call still goes through)."""
    inodes: set[int] = set()
    real = os.fsync

    def record(fd):
        inodes.add(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return inodes


def test_checkpoint_and_summary_are_flushed_to_disk_before_and_after_the_rename(tmp_path, synced):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    final = save_checkpoint(run, 1, {"w": weight}, optimizer, scheduler, {"tokens_seen": 0})
    run.write_summary({"method": "full"})
    files = list(final.iterdir())
    assert {p.name for p in files} == {"trainable.safetensors", "optimizer.pt", "state.json", "manifest.json"}
    # every file of the checkpoint, the checkpoint directory, and the directories the renames changed
    wanted = [*files, final, run.checkpoints, run.summary, run.root]
    assert [p.name for p in wanted if p.stat().st_ino not in synced] == []
