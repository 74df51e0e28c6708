"""Optimizer in backward: the same steps as the plain loop, with gradients freed one parameter at a time."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, write_corpus
from safetensors.torch import load_file

from adaptlab.errors import UserError
from adaptlab.optim_backward import BackwardUpdates
from adaptlab.rundir import RunDir
from adaptlab.train import build_optimizer, build_scheduler, prepare, resume_run, train, train_step


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _rows(run_dir):
    return [r for r in RunDir(run_dir).read_metrics() if "loss" in r]


def _artifact(run_dir, method):
    name = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    return load_file(str(run_dir / name))


@pytest.mark.parametrize(("method", "grad_accum"), [("full", 1), ("full", 2), ("lora", 2)])
def test_same_steps_as_the_plain_loop(corpus, tmp_path, method, grad_accum):
    kw = {"method": method, "steps": 4, "batch": 2 // grad_accum * 2, "grad_accum": grad_accum}
    plain = train(tiny_config(corpus, tmp_path / "plain", max_grad_norm=None, **kw))
    inbwd = train(tiny_config(corpus, tmp_path / "inbwd", optimizer_in_backward=True, **kw))
    a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "inbwd")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # AdamW's update is elementwise: bit for bit
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["grad_norm"] for r in b] == pytest.approx([r["grad_norm"] for r in a], rel=1e-5)
    assert plain["final_val_loss"] == inbwd["final_val_loss"]
    wa, wb = _artifact(tmp_path / "plain", method), _artifact(tmp_path / "inbwd", method)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_equals_uninterrupted(corpus, tmp_path):
    kw = {"method": "full", "steps": 6, "save_every": 3, "optimizer_in_backward": True}
    whole = train(tiny_config(corpus, tmp_path / "whole", **kw))

    def stop_at_5(row):
        if row.get("step") == 5 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, tmp_path / "cut", **kw), on_log=stop_at_5)
    resumed = resume_run(tmp_path / "cut")
    assert resumed["final_train_loss"] == whole["final_train_loss"]
    wa, wb = _artifact(tmp_path / "whole", "full"), _artifact(tmp_path / "cut", "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _stack(width: int = 16, depth: int = 4) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])


def _count_alive(params: list[torch.nn.Parameter]) -> list[int]:
    """Gradients alive each time autograd completes one (hooks registered before the updates' run first)."""
    held: list[int] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    return held


def test_gradients_are_freed_as_they_are_applied():
    model = _stack()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    held = _count_alive(params)
    updates = BackwardUpdates(optimizer, params)
    before = [p.detach().clone() for p in params]
    updates.armed = True
    model(torch.randn(8, 16)).pow(2).sum().backward()
    norm = updates.finish()
    assert len(held) == len(params) and max(held) == 1  # each is applied and freed before the next
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, q) for p, q in zip(params, before, strict=True))
    assert norm > 0 and updates.finish() == 0.0  # the norm is the step's, then reset


def test_the_loop_frees_each_gradient_in_backward(corpus, tmp_path):
    config = tiny_config(corpus, tmp_path / "run", method="full", optimizer_in_backward=True)
    setup = prepare(config)
    params = list(setup.params.values())
    optimizer = build_optimizer(setup.params, config.train, 1e-3)
    held = _count_alive(params)
    updates = BackwardUpdates(optimizer, params)
    train_step(
        setup,
        setup.objective.micro_batches(setup, 0),
        optimizer,
        build_scheduler(optimizer, 4, config.train),
        updates,
    )
    assert len(held) == len(params) and max(held) == 1  # tied embedding and head: one gradient, once


def test_accumulated_gradients_wait_for_the_last_micro_batch():
    """An earlier micro-batch's gradients stay until the last backward completes each parameter's sum."""
    plain, inbwd = _stack(), _stack()
    x = torch.randn(2, 8, 16)
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(inbwd.parameters(), lr=1e-2, fused=True)
    updates = BackwardUpdates(opt_b, inbwd.parameters())
    for m in range(2):
        plain(x[m]).pow(2).sum().backward()
        updates.armed = m == 1
        inbwd(x[m]).pow(2).sum().backward()
    opt_a.step()
    updates.armed = False
    updates.finish()
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), inbwd.parameters(), strict=True))


def test_clipping_is_refused_and_the_default_dropped(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "a", optimizer_in_backward=True)
    assert cfg.train.max_grad_norm is None
    with pytest.raises(UserError, match="max_grad_norm"):
        tiny_config(corpus, tmp_path / "b", optimizer_in_backward=True, max_grad_norm=1.0)


def test_cli_flag_and_one_process_only(corpus, tmp_path, run_cli):
    out = run_cli("train", "--model", "tiny-random", "--method", "full", "--data", str(corpus), "--steps", "2",
                  "--batch", "2", "--seq-len", "32", "--precision", "fp32", "--optimizer-in-backward",
                  "--out", str(tmp_path / "run"))  # fmt: skip
    assert out[0] == 0, out
    assert "optimizer_in_backward: true" in (tmp_path / "run" / "config.yaml").read_text()
    out = run_cli("train", "--model", "tiny-random", "--data", str(corpus), "--steps", "2",
                  "--optimizer-in-backward", "--nproc", "2", "--out", str(tmp_path / "two"))  # fmt: skip
    assert out[0] == 2
    assert "one process" in out[2] and "Traceback" not in out[2]
    assert not (tmp_path / "two").exists()
