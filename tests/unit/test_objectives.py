"""The objectives interface: config section and flags, the sft objective the loop calls, row order."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, write_corpus

from adaptlab.cli.train import FLAG_FIELDS, _overrides, train_command
from adaptlab.config import build_config
from adaptlab.errors import UserError
from adaptlab.objectives import batch_indices, objective_for
from adaptlab.objectives.sft import SFTObjective, token_loss_sum
from adaptlab.train import prepare


def _flags(**given):
    """train_command's flags as click passes them when only `given` are on the command line."""
    flags = {p.name: () if getattr(p, "multiple", False) else None for p in train_command.params}
    flags.update(given)
    return flags


def test_objective_flags_land_in_the_objective_section():
    over = _overrides(**_flags(task="dpo", beta=0.3, dpo_loss="ipo", group_size=4, kl_beta=0.05))
    config = build_config(over)
    assert config.objective.task == "dpo"
    assert (config.objective.beta, config.objective.loss) == (0.3, "ipo")
    assert (config.objective.group_size, config.objective.kl_beta) == (4, 0.05)
    assert "objective" not in _overrides(**_flags())  # no flag given: the YAML's section stays


def test_every_config_flag_of_train_lands_in_the_config():
    """A flag of `adaptlab train` either sets a config field (FLAG_FIELDS) or is the command's own."""
    own = {
        "config_path",
        "resume",
        "quiet",
        "overwrite",
        "parallel",
        "nproc",
        "no_memory_check",
        "report_to",
        "push_to_hub",
        "out",
    }
    mapped = {flag for fields in FLAG_FIELDS.values() for flag in fields.values()}
    assert {p.name for p in train_command.params} - own == mapped
    values = {"data": ("a.txt", "b.txt"), "rank": 4, "rslora": False, "lr": 1e-3, "text_field": "body"}
    over = _overrides(**_flags(**values, out="run"))
    assert over == {
        "method": {"rank": 4, "rslora": False},
        "data": {"train": ["a.txt", "b.txt"], "text_field": "body"},
        "train": {"lr": 1e-3},
        "out": "run",
    }


def test_default_objective_is_sft_and_bad_values_name_the_field():
    assert build_config({}).objective.task == "sft"
    assert objective_for(build_config({})).name == "sft"
    with pytest.raises(UserError, match="objective.group_size"):
        build_config({"objective": {"task": "grpo", "group_size": 1}})
    with pytest.raises(UserError, match="objective.task"):
        build_config({"objective": {"task": "ppo"}})
    with pytest.raises(UserError, match="objective.beta"):
        build_config({"objective": {"task": "dpo", "beta": 0}})


def test_batch_indices_cover_each_epoch_once_in_a_seeded_order():
    first = batch_indices(0, 10, 10, seed=3)
    assert sorted(first) == list(range(10))
    assert batch_indices(1, 10, 10, seed=3) != first  # the next epoch is another order
    assert batch_indices(2, 10, 5, seed=3) == batch_indices(1, 10, 10, seed=3)[:5]


def test_sft_objective_loss_is_the_summed_token_loss_over_its_normaliser(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    setup = prepare(tiny_config(corpus, tmp_path / "run", steps=2, grad_accum=2))
    assert isinstance(setup.objective, SFTObjective)
    micro = setup.objective.micro_batches(setup, 0)
    assert len(micro) == 2 and all("attention_mask" in b for b in micro)
    n = setup.objective.normaliser(setup, micro)
    assert n == sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    with torch.no_grad():
        loss, metrics = setup.objective.loss(setup, micro[0])
        expected, _ = token_loss_sum(setup.model, micro[0])
    assert metrics == {} and float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert set(setup.objective.validation(setup)) == {"val_loss"}


class CountingObjective(SFTObjective):
    """SFT that counts the micro-batches it built: objective state a resume must restore."""

    def __init__(self, spec=None) -> None:
        super().__init__(spec)
        self.built = 0

    def micro_batches(self, setup, step):
        self.built += 1
        return super().micro_batches(setup, step)

    def state_dict(self):
        return {"built": self.built}

    def load_state_dict(self, state):
        self.built = state["built"]


def test_objective_state_goes_into_checkpoints_and_comes_back_on_resume(tmp_path, monkeypatch):
    import json

    from adaptlab import objectives
    from adaptlab.train import resume_run, train

    monkeypatch.setitem(objectives.TASKS, "sft", "test_objectives:CountingObjective")
    corpus = write_corpus(tmp_path / "corpus", n_docs=12)
    seen = []

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(corpus, tmp_path / "run", steps=4, save_every=2), on_log=stop_at_3)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["objective"] == {"built": 2}
    resume_run(tmp_path / "run", on_start=lambda setup: seen.append(setup.objective))
    assert seen[0].built == 4  # restored at 2, then steps 3 and 4
