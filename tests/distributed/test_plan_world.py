"""`adaptlab plan --gpus N`: per-device memory under DDP and FSDP2 and the strategy that fits."""

from __future__ import annotations

import pytest

from adaptlab.errors import UserError
from adaptlab.plan.arch import load_arch
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
    """dpo: every device runs chosen and rejected rows, so activations double; grpo without its
    sampling (plan_world called alone) says what is left out."""
    sft = plan_world("tiny-random", 2, 80 * 2**30, batch=4)["methods"]["lora"]["ddp"]["memory"]
    dpo = plan_world("tiny-random", 2, 80 * 2**30, batch=4, task="dpo")["methods"]["lora"]["ddp"]["memory"]
    assert dpo["activations"] == 2 * sft["activations"] and dpo["weights"] == sft["weights"]
    notes = plan_world("tiny-random", 2, 80 * 2**30, batch=4, task="grpo")["notes"]
    assert any("sampling" in n for n in notes)


def test_grpo_adds_each_devices_kv_cache_and_full_fine_tunings_whole_reference_copy():
    """grpo: a device samples its share of the step's prompts (its rows' KV cache) and trains on
    micro-batches of `batch` rows of prompt + completion; full fine-tuning's KL reference is a whole
    frozen copy on every device, not sharded, and equals the single-device plan's."""
    from adaptlab.plan.estimate import generation_memory_bytes, reference_copy_bytes
    from adaptlab.plan.grpo import Sampling
    from adaptlab.plan.world import GrpoSteps

    arch = load_arch("tiny-random")
    steps = GrpoSteps(prompt_len=40, sampling=Sampling(8, 32), kl_beta=0.05)
    two = plan_world("tiny-random", 2, 80 * GIB, batch=4, grad_accum=2, task="grpo", grpo=steps)
    four = plan_world("tiny-random", 4, 80 * GIB, batch=4, grad_accum=2, task="grpo", grpo=steps)
    for w, rows in ((two, 4 * 2 // 2 * 8), (four, 4 * 2 // 4 * 8)):
        full = w["methods"]["full"]
        assert not any("not in it" in n for n in w["notes"])
        for strategy in ("ddp", "fsdp"):
            mem = full[strategy]["memory"]
            assert mem["generation"] == generation_memory_bytes(arch, rows, 72, "bf16")
            assert mem["reference"] == reference_copy_bytes(arch, "bf16")  # whole, under FSDP too
            assert mem["peak"] >= mem["reference"] + max(mem["activations"], mem["generation"])
        assert w["methods"]["lora"]["ddp"]["memory"]["reference"] == 0  # the adapter-disabled pass
    # the same micro-batch of `batch` rows on every device: activations do not shrink with more GPUs
    assert (
        two["methods"]["lora"]["ddp"]["memory"]["activations"]
        == (four["methods"]["lora"]["ddp"]["memory"]["activations"])
    )
    no_kl = plan_world("tiny-random", 2, 80 * GIB, batch=4, grad_accum=2, task="grpo", grpo=GrpoSteps(40))
    assert no_kl["methods"]["full"]["ddp"]["memory"]["reference"] == 0


def test_plan_cli_gpus_with_grpo_plans_the_tasks_sampling(run_cli):
    import json

    code, out, _ = run_cli(
        "plan",
        "--model",
        "tiny-random",
        "--data",
        "arithmetic",
        "--task",
        "grpo",
        "--kl-beta",
        "0.1",
        "--gpus",
        "2",
        "--memory",
        "8GiB",
        "--no-benchmark",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    sampling = result["setup"]["sampling"]
    assert sampling["group_size"] == 8 and sampling["prompt_len"] > 0
    full = result["world"]["methods"]["full"]["ddp"]["memory"]
    assert full["generation"] > 0 and full["reference"] > 0
