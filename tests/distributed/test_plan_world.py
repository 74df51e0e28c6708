"""`adaptlab plan --gpus N`: per-device memory under DDP and FSDP2 and the strategy that fits."""

from __future__ import annotations

import pytest

from adaptlab.errors import UserError
from adaptlab.plan.world import plan_world

pytestmark = pytest.mark.distributed

GIB = 2**30


def test_fsdp_shards_what_ddp_replicates():
    w = plan_world("tiny-random", 4, 80 * GIB, batch=4, seq_len=64)
    full = w["methods"]["full"]
    ddp, fsdp = full["ddp"]["memory"], full["fsdp"]["memory"]
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp[part] == -(-ddp[part] // 4)
    assert full["fsdp"]["peak_mem_bytes"] < full["ddp"]["peak_mem_bytes"]
    assert w["device_micro_batch"] == 1  # global batch 4 over 4 devices
    assert w["methods"]["qlora"]["fsdp"] is None  # its 4-bit base cannot be sharded
    assert w["recommendation"]["full"] == "ddp"  # fits everywhere: DDP, which gathers nothing


def test_fsdp_when_only_a_shard_fits():
    probe = plan_world("tiny-random", 4, 80 * GIB, batch=4, seq_len=64)["methods"]["full"]
    between = (probe["ddp"]["peak_mem_bytes"] + probe["fsdp"]["peak_mem_bytes"]) // 2
    w = plan_world("tiny-random", 4, between, batch=4, seq_len=64)
    assert w["recommendation"]["full"] == "fsdp"
    tight = plan_world("tiny-random", 4, probe["fsdp"]["peak_mem_bytes"] - 1, batch=4, seq_len=64)
    assert tight["recommendation"]["full"] is None


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(UserError, match="--gpus 3 does not divide the global batch 4"):
        plan_world("tiny-random", 3, 80 * GIB, batch=4)


def test_plan_cli_bad_world_flags(run_cli):
    base = ("plan", "--model", "tiny-random", "--data", "python-stdlib", "--no-benchmark")
    code, _, err = run_cli(*base, "--gpus", "3", "--memory", "8GiB")
    assert code == 2 and err.count("\n") == 1 and "--gpus 3 does not divide" in err
    code, _, err = run_cli(*base, "--parallel", "fsdp")
    assert code == 2 and "--parallel needs --gpus N" in err


def test_a_preference_pair_is_two_rows_per_device():
    """dpo: every device runs chosen and rejected rows, so activations double; grpo says what is left out."""
    sft = plan_world("tiny-random", 2, 80 * 2**30, batch=4)["methods"]["lora"]["ddp"]["memory"]
    dpo = plan_world("tiny-random", 2, 80 * 2**30, batch=4, task="dpo")["methods"]["lora"]["ddp"]["memory"]
    assert dpo["activations"] == 2 * sft["activations"] and dpo["weights"] == sft["weights"]
    notes = plan_world("tiny-random", 2, 80 * 2**30, batch=4, task="grpo")["notes"]
    assert any("sampling" in n for n in notes)
