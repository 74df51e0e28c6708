"""adaptlab plan: parameter counts, the memory arithmetic, data counting, and the CLI contract."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from adaptlab.config import MethodSpec
from adaptlab.errors import UserError
from adaptlab.fused import fuse_mlps
from adaptlab.methods import apply_method, param_report
from adaptlab.models import load_tokenizer
from adaptlab.plan import estimate, parse_memory, timing
from adaptlab.plan.arch import arch_from_config, load_arch, targets_for
from adaptlab.plan.datasize import measure_data
from adaptlab.plan.estimate import Arm, Shape, layer_activation_bytes, memory_breakdown, trainable_params

ALL = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


def smollm2_config() -> LlamaConfig:
    """SmolLM2-135M's architecture (DATA.md), without its weights."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


def small_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )


def test_smollm2_trainable_params_pinned():
    arch = arch_from_config(smollm2_config(), "smollm2-shape")
    assert arch.total_params == 134_515_008
    assert trainable_params(arch, Arm("full")) == 134_515_008
    assert trainable_params(arch, Arm("lora", 8, ALL)) == 2_442_240
    assert trainable_params(arch, Arm("lora", 8, ("q_proj", "v_proj"))) == 460_800
    assert trainable_params(arch, Arm("dora", 8, ("q_proj", "v_proj"))) == 460_800 + 30 * (576 + 192)
    assert (arch.n_layers, arch.hidden, arch.kv_dim, arch.vocab, arch.tied) == (30, 576, 192, 49152, True)


@pytest.mark.parametrize(
    "method,rank,targets", [("lora", 8, "all-linear"), ("dora", 4, "q_proj,v_proj"), ("lora", 16, "mlp")]
)
def test_counts_match_peft_on_a_real_model(tiny, method, rank, targets):
    """The analytic count equals what peft builds on the real tiny-random model."""
    import copy

    arch = load_arch("tiny-random")
    names = targets_for(arch, targets)
    model = apply_method(copy.deepcopy(tiny.model), MethodSpec(method=method, rank=rank, targets=targets))
    assert trainable_params(arch, Arm(method, rank, tuple(names))) == param_report(model).trainable
    assert arch.total_params == param_report(tiny.model).total


def test_unknown_target_lists_what_exists():
    arch = arch_from_config(small_config())
    with pytest.raises(UserError, match="q_proj"):
        targets_for(arch, ["nope_proj"])


def test_memory_breakdown_hand_computed():
    """1 layer, hidden 8, intermediate 16, 2 heads / 1 KV head, vocab 128, tied; batch 2 x 4 tokens."""
    arch = arch_from_config(small_config())
    assert (arch.total_params, arch.linear_params, arch.q_dim, arch.kv_dim) == (1624, 576, 8, 4)
    gpu_fp32 = Shape(batch=2, seq_len=4, precision="fp32", device_type="cuda")
    lora = Arm("lora", 2, ("q_proj", "v_proj"))
    assert arch.fused_mlp  # a Llama MLP: gate and up outputs saved, not the SiLU's (adaptlab.fused)
    assert arch.fused_norms  # Llama norms: their outputs rebuilt in backward (adaptlab.fused_norm)
    # norms 2*4*8 + sdpa 4*(2*8+2*4) + mlp 2*4*16 + A out 4*2*2; the q/v input (the fp32 norm output) is rebuilt
    assert layer_activation_bytes(arch, lora, "fp32") == 64 + 96 + 128 + 16
    assert layer_activation_bytes(arch, lora, "fp32", norms_fused=False) == 64 + 96 + 128 + 32 + 16
    mem = memory_breakdown(arch, lora, gpu_fp32, runtime_bytes=1000)
    assert mem["weights"] == 4 * 1624 and mem["gradients"] == 4 * 56 and mem["optimizer"] == 8 * 56
    assert mem["activations"] == 304 * 8 + 4 * 8 * 8  # + the final norm's input
    # the chunked loss: one chunk of fp32 logits (all 8 tokens fit one) + the hidden states' gradient
    assert mem["logits"] == 8 * 128 * 4 + 4 * 8 * 8
    assert mem["peak"] == 1000 + 6496 + 448 + 2688 + 4352
    full = memory_breakdown(arch, Arm("full"), gpu_fp32, runtime_bytes=1000)
    # norm inputs 64 + sdpa 96 + mlp 128 (the normalised inputs, the norm outputs and the down input are
    # rebuilt); final norm input, output and head input 3*4*8; the head's gradient 4*128*8 arrives early
    assert full["activations"] == 288 * 8 + 96 * 8
    assert full["peak"] == 1000 + 6496 + 12992 + 3072 + 4352 + 4096
    inbwd = memory_breakdown(arch, Arm("full"), replace(gpu_fp32, optimizer_in_backward=True), 1000)
    assert inbwd["gradients"] == 4 * 128 * 8  # only the one being applied, the largest: the tied embedding's
    # the step's peak, 1000 + 6496 + 2 x 4096 + 12992, is under the forward's, which stays the peak
    assert inbwd["peak"] == full["peak"]
    bf16 = memory_breakdown(arch, Arm("full"), Shape(2, 4, precision="bf16", device_type="cuda"), 0)
    # the trained Linears keep their fp32 weights and inputs (adaptlab.autocast_linear): one block's bf16
    # weights and the head's are cast at a time, and the Linears' inputs are the norms' rebuilt outputs
    assert bf16["weight_copies"] == 2 * (576 + 1024)
    assert bf16["activations"] == (64 + 48 + 64) * 8 + (32 + 32 + 16) * 8
    casts = estimate.layer_activation_bytes(arch, Arm("full"), "bf16", linears_fused=False)
    assert casts == 64 + 48 + 64 + 2 * 5 * 8  # a bf16 cast for each of q, k, v, gate, up
    ckpt = memory_breakdown(
        arch, lora, Shape(2, 4, precision="fp32", grad_checkpointing=True, device_type="cuda"), 0
    )
    assert ckpt["activations"] == 4 * 8 * 8 + 336 * 8 + 4 * 8 * 8
    qlora = memory_breakdown(arch, Arm("qlora", 2, ("q_proj", "v_proj")), gpu_fp32, 0)
    assert qlora["weights"] == round(576 * (0.5 + 0.127 / 8)) + 4 * (1624 - 576)


def test_frozen_linears_held_in_bf16_at_bf16(monkeypatch):
    """Under bf16 autocast training holds frozen Linears in bf16 (adaptlab.frozen_base): 2 bytes a weight
    and no bf16 copy of them; DoRA's bases stay fp32; FSDP2 holds none; fp32 training holds none."""
    arch = arch_from_config(small_config())
    gpu_bf16 = Shape(2, 4, precision="bf16", device_type="cuda")
    lora = Arm("lora", 2, ("q_proj", "v_proj"))
    held = memory_breakdown(arch, lora, gpu_bf16, 0)
    assert held["weights"] == 4 * 1624 - 2 * 576  # every block Linear; the tied head stays fp32
    assert held["weight_copies"] == 2 * 1024  # the loss casts the head; no block weight is cast
    unheld = memory_breakdown(
        arch, lora, gpu_bf16, 0, transforms=replace(estimate.eager(lora, gpu_bf16), hold_base_bf16=False)
    )
    assert unheld["weights"] == 4 * 1624 and unheld["weight_copies"] == 2 * (576 + 1024)
    assert memory_breakdown(arch, lora, replace(gpu_bf16, precision="fp32"), 0)["weights"] == 4 * 1624
    dora = memory_breakdown(arch, Arm("dora", 2, ("q_proj", "v_proj")), gpu_bf16, 0)
    assert dora["weights"] == 4 * 1624 - 2 * (576 - 8 * 8 - 8 * 4)  # q (8 x 8) and v (8 x 4) stay fp32
    assert memory_breakdown(arch, Arm("full"), gpu_bf16, 0)["weights"] == 4 * 1624
    fast = estimate.step_time_s(arch, lora, gpu_bf16, 1e9, 1e9)["elementwise_s"]
    monkeypatch.setattr(timing, "held_params", lambda *a: 0)
    monkeypatch.setattr(timing, "held_block_params", lambda *a: 0)
    slow = estimate.step_time_s(arch, lora, gpu_bf16, 1e9, 1e9)["elementwise_s"]
    # no cast of the block weights in forward or again in backward: 6 bytes a weight each (read 4, write 2)
    assert (slow - fast) * 1e9 == pytest.approx(2 * 6 * 576)


def test_optimizer_in_backward_drops_the_gradients_from_the_step_peak():
    """smollm2-135m full fine-tuning, 4 x 128 under gradient checkpointing, peaks at the optimizer step."""
    arch = arch_from_config(smollm2_config())
    shape = Shape(4, 128, precision="fp32", grad_checkpointing=True, device_type="cuda")
    plain = memory_breakdown(arch, Arm("full"), shape, 0)
    inbwd = memory_breakdown(arch, Arm("full"), replace(shape, optimizer_in_backward=True), 0)
    step_peak = plain["weights"] + plain["gradients"] + plain["optimizer"] + inbwd["gradients"]
    assert plain["peak"] == step_peak
    assert inbwd["gradients"] == 4 * 49152 * 576
    assert plain["peak"] - inbwd["peak"] > 0.3e9  # the forward's peak now sets it


def test_step_time_hand_computed():
    """Full fine-tuning of the 1-layer model, 2 micro-batches of 2 x 4 tokens, 1 GFLOP/s and 1 GB/s."""
    arch = arch_from_config(small_config())
    n = arch.matmul_params
    assert n == 576 + 128 * 8  # the Linears and the tied head
    t = estimate.step_time_s(arch, Arm("full"), Shape(2, 4, grad_accum=2, precision="fp32"), 1e9, 1e9)
    tokens = 16
    attn = 2 * 4 * 8  # QK^T and AV of one layer, causal half, per token
    assert t["matmul_s"] == pytest.approx(6 * n * tokens / (estimate.MATMUL_EFFICIENCY * 1e9))
    assert t["attention_s"] == pytest.approx(3 * attn * tokens / (estimate.MATMUL_EFFICIENCY * 1e9))
    traffic = estimate.ACTIVATION_PASSES * 416 * tokens + estimate.LOGIT_PASSES * 4 * 128 * tokens
    assert t["elementwise_s"] == pytest.approx(traffic / 1e9)
    assert t["optimizer_s"] == pytest.approx(28 * 1624 / 1e9)
    assert t["overhead_s"] == pytest.approx(2 * estimate.MICRO_BATCH_OVERHEAD_S)
    assert t["step_s"] == pytest.approx(sum(v for k, v in t.items() if k != "step_s"))
    # bf16 autocast: each weight cast to bf16 per micro-batch, and full fine-tuning's gradients back;
    # the block weights cast again in backward (adaptlab.autocast_linear keeps the fp32 ones)
    bf16 = estimate.step_time_s(arch, Arm("full"), Shape(2, 4, grad_accum=2, precision="bf16"), 1e9, 1e9)
    # the norms' rebuilt tensors and the recast inputs are written and read like saved ones
    acts = estimate.layer_activation_bytes(arch, Arm("full"), "bf16", norms_fused=False, linears_fused=False)
    acts *= arch.n_layers * tokens
    plain = estimate.ACTIVATION_PASSES * acts + estimate.LOGIT_PASSES * 4 * 128 * tokens
    assert bf16["elementwise_s"] == pytest.approx((plain + 2 * 6 * n * 2 + 2 * 6 * 576) / 1e9)
    # attention at its own measured rate when there is one
    own = estimate.step_time_s(arch, Arm("full"), Shape(2, 4, grad_accum=2, precision="fp32"), 1e9, 1e9, 1e8)
    assert own["attention_s"] == pytest.approx(3 * attn * tokens / 1e8)
    assert own["step_s"] - t["step_s"] == pytest.approx(own["attention_s"] - t["attention_s"])
    lora = estimate.step_time_s(
        arch, Arm("lora", 2, ("q_proj", "v_proj")), Shape(2, 4, grad_accum=2, precision="fp32"), 1e9, 1e9
    )
    # the adapters' reads and writes, q (8 -> 8) and v (8 -> 4): fused LoRA, 4 passes over d_out and 4 over d_in
    adapters = 4 * tokens * ((4 * 8 + 4 * 8) + (4 * 4 + 4 * 8))
    traffic = estimate.ACTIVATION_PASSES * 336 * tokens + estimate.LOGIT_PASSES * 4 * 128 * tokens
    assert lora["elementwise_s"] == pytest.approx((traffic + adapters) / 1e9)


@pytest.mark.parametrize(
    "method,precision,dropout",
    [(m, p, 0.0) for p in ("fp32", "bf16") for m in ("full", "lora", "qlora", "dora")]
    + [(m, p, 0.1) for p in ("fp32", "bf16") for m in ("lora", "qlora")],
)
def test_activation_formula_matches_autograd(method, precision, dropout, monkeypatch):
    """The per-layer count equals the bytes autograd really saves in training (sdpa, the model fused as
    training fuses it) within 10%, in fp32 and under bf16 autocast, with LoRA dropout's masks."""
    from transformers import AutoModelForCausalLM

    from adaptlab import fused, fused_norm
    from adaptlab.autocast_linear import fuse_autocast_linears
    from adaptlab.fused_lora import fuse_loras

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    arch = arch_from_config(cfg)
    arm = Arm("full") if method == "full" else Arm(method, 4, ALL, dropout)
    model = apply_method(model, MethodSpec(method=method, rank=4, dropout=dropout))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[-1] != cfg.vocab_size:  # logits are counted separately
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    recipe_hooks = fused_norm._recipe_hooks

    def counting(recipes: list) -> tuple:  # a block's own hooks win inside it: count what they keep
        keep, unpack = recipe_hooks(recipes)
        return (lambda t: pack(kept) if isinstance(kept := keep(t), torch.Tensor) else kept), unpack

    product_hooks = fused._product_hooks

    def counting_product(*args: torch.Tensor) -> tuple:  # down_proj saves its dropout mask inside these
        keep, unpack = product_hooks(*args)
        return (lambda t: pack(kept) if isinstance(kept := keep(t), torch.Tensor) else kept), unpack

    monkeypatch.setattr(fused_norm, "_recipe_hooks", counting)
    monkeypatch.setattr(fused, "_product_hooks", counting_product)
    fuse_mlps(model)  # as training does (adaptlab.train.prepare)
    fuse_loras(model)
    fuse_autocast_linears(model)
    assert fused_norm.fuse_norms(model) == cfg.num_hidden_layers
    model.train()

    ids = torch.randint(0, 256, (2, 32))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"),
    ):
        model(input_ids=ids, use_cache=False).logits.sum()
    measured = sum(v for k, v in saved.items() if k not in params)
    planned = memory_breakdown(arch, arm, Shape(2, 32, precision=precision, device_type="cuda"), 0)[
        "activations"
    ]
    assert planned == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GiB", 24 * 2**30),
        ("24G", 24 * 2**30),
        ("16GB", 16 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TiB", int(1.5 * 2**40)),
        ("4096", 4096),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24XB", "", "GiB", "-1G", "24 Gibberish"])
def test_parse_memory_rejects(text):
    with pytest.raises(UserError, match="--memory"):
        parse_memory(text)


def _write_docs(path, n: int, words: int = 40) -> None:
    import random

    rng = random.Random(0)
    vocab = [
        "alpha",
        "beta",
        "gamma",
        "licence",
        "shall",
        "warranty",
        "(c)",
        "2024",
        "Software",
        "permission",
    ]
    with path.open("w") as fh:
        for i in range(n):
            k = rng.randint(words // 4, words * 2)
            fh.write(
                json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(vocab) for _ in range(k))}) + "\n"
            )


def test_data_exact_count_matches_tokenizer(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, 50)
    tok = load_tokenizer("tiny-random")
    size = measure_data([str(path)], tok, seq_len=32)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert size.exact and size.documents == 50 and size.tokens_ci95 == 0
    assert size.tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    assert size.tokens_per_epoch % 32 == 0 and 0 < size.tokens_per_epoch <= size.tokens + 50


def test_data_sampled_estimate_covers_exact(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, 1200)
    tok = load_tokenizer("tiny-random")
    exact = measure_data([str(path)], tok, seq_len=64)
    est = measure_data([str(path)], tok, seq_len=64, exact_chars=1000, sample_docs=200)
    assert not est.exact and est.sampled_documents == 200 and est.tokens_ci95 > 0
    assert abs(est.tokens - exact.tokens) <= 1.5 * est.tokens_ci95
    assert est.tokens_per_epoch == pytest.approx(exact.tokens_per_epoch, rel=0.1)


def test_chat_data_is_ift(tmp_path, run_cli):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"define word{i}", "response": "a thing " * 5}) + "\n" for i in range(20)
        )
    )
    code, out, err = run_cli("plan", "--model", "tiny-random", "--data", path, "--json", "--no-benchmark")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "ift" and result["data"]["kind"] == "chat" and result["data"]["documents"] == 20


def test_cli_json_contract(tmp_path, run_cli):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, 30)
    code, out, err = run_cli(
        "plan",
        "--model",
        "tiny-random",
        "--data",
        path,
        "--ranks",
        "8,16,32",
        "--memory",
        "24GiB",
        "--seq-len",
        "64",
        "--batch",
        "2",
        "--json",
        "--no-benchmark",
    )
    assert code == 0, err
    result = json.loads(out)
    assert {"documents", "tokens"} <= set(result["data"])
    assert set(result["methods"]) == {"full", "lora", "lora_r8", "lora_r32", "dora", "qlora"}
    for entry in result["methods"].values():
        assert {
            "trainable_params",
            "peak_mem_bytes",
            "fits",
            "time_per_epoch_s",
            "artifact_bytes",
            "memory",
        } <= set(entry)
        assert entry["fits"] is True and entry["time_per_epoch_s"] > 0
    assert result["methods"]["lora"]["rank"] == 16 and result["methods"]["lora_r8"]["rank"] == 8
    rec = result["recommendation"]
    assert rec["method"] in ("full", "lora", "dora", "qlora") and rec["reasons"]
    assert (
        rec["command"].startswith("adaptlab compare --model tiny-random --data ")
        and "--study methods" in rec["command"]
    )


def test_lora_dropout_adds_its_masks_and_draws_to_the_lora_family(tmp_path):
    """--dropout: a bool mask per token and input feature of every target (LoRA and QLoRA keep it for
    backward), the draws timed apart; full fine-tuning has no adapter to drop into."""
    from adaptlab.plan import plan

    path = tmp_path / "docs.jsonl"
    _write_docs(path, 30)
    kwargs = {"seq_len": 64, "batch": 2, "benchmark": False, "precision": "fp32", "device": "cpu"}
    without = plan("tiny-random", [str(path)], **kwargs)["methods"]
    dropped = plan("tiny-random", [str(path)], dropout=0.1, **kwargs)
    arch = load_arch("tiny-random")
    masks = 2 * 64 * sum(i for _, (i, _o) in arch.linear_shapes.items())  # all-linear targets, 1 byte each
    for key in ("lora", "qlora"):
        grown = dropped["methods"][key]["memory"]["activations"] - without[key]["memory"]["activations"]
        assert grown == masks, key
        draws = dropped["methods"][key]["time_breakdown_s"]["dropout_draws_s"]
        assert draws == pytest.approx(masks / estimate.NOMINAL_DROPOUT_DRAWS_PER_S)
        assert dropped["methods"][key]["step_s"] > without[key]["step_s"] + draws
    assert dropped["methods"]["full"]["memory"] == without["full"]["memory"]
    assert dropped["setup"]["dropout"] == 0.1


def test_dropout_throughput_times_the_draws(tmp_path, monkeypatch):
    from adaptlab.plan import measure

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path))
    rate = measure.dropout_throughput("cpu")
    assert rate["dropout_draws_per_s"] > 0
    assert measure.dropout_throughput("cpu") == rate  # cached


def test_memory_limit_drives_the_recommendation(tmp_path):
    from adaptlab.plan import plan

    path = tmp_path / "docs.jsonl"
    _write_docs(path, 30)
    base = plan("tiny-random", [str(path)], seq_len=64, batch=2, benchmark=False)
    full, lora = base["methods"]["full"]["peak_mem_bytes"], base["methods"]["lora"]["peak_mem_bytes"]
    assert lora < full
    squeezed = plan(
        "tiny-random", [str(path)], seq_len=64, batch=2, benchmark=False, memory=(full + lora) // 2
    )
    assert squeezed["methods"]["full"]["fits"] is False and squeezed["methods"]["lora"]["fits"] is True
    assert squeezed["recommendation"]["method"] == "lora"
    assert any("does not fit" in r for r in squeezed["recommendation"]["reasons"])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "NODATA/missing.jsonl"], "no such file"),
        (["--data", "DATA", "--memory", "24XB"], "--memory"),
        (["--data", "DATA", "--ranks", "8,x"], "--ranks"),
        (["--data", "DATA", "--optimizer-in-backward", "--gpus", "2", "--memory", "80GiB"], "one process"),
        (["--data", "DATA", "--dropout", "1.5"], "--dropout"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, run_cli, args, match):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, 5)
    args = [str(path) if a == "DATA" else a.replace("NODATA", str(tmp_path)) for a in args]
    code, out, err = run_cli("plan", "--model", "tiny-random", *args, "--no-benchmark")
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_model_exit_2(tmp_path, run_cli):
    path = tmp_path / "docs.jsonl"
    _write_docs(path, 5)
    code, _, err = run_cli("plan", "--model", str(tmp_path / "no-model"), "--data", path, "--no-benchmark")
    assert code == 2 and "no such directory" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_device_throughput_times_a_linears_three_matmul_mixes(tmp_path, monkeypatch, precision):
    """Trained weight, frozen weight, forward alone: each a positive rate, cached per precision and shape."""
    from adaptlab.plan import measure

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path))
    rate = measure.device_throughput("cpu", precision, 64, 32, 48, seconds=0.05)
    for key in ("matmul_flops_per_s", "frozen_matmul_flops_per_s", "forward_flops_per_s", "mem_bytes_per_s"):
        assert rate[key] > 0, key
    assert rate["shape"] == [64, 32, 48] and rate["precision"] == precision
    assert measure.device_throughput("cpu", precision, 64, 32, 48) == rate  # the cached measurement
    lora = Arm("lora", 8, ("q_proj",))
    assert estimate.matmul_rate(rate, lora) == rate["frozen_matmul_flops_per_s"]
    assert estimate.matmul_rate(rate, Arm("full")) == rate["matmul_flops_per_s"]
    assert estimate.matmul_rate({"matmul_flops_per_s": 1.0}, lora) == 1.0  # a measurement from before


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_throughput_times_causal_sdpa_in_training(tmp_path, monkeypatch, precision):
    """Forward and backward of causal SDPA: a positive rate, cached per precision and shape, in the units
    the plan counts attention in (so a measured rate turns the plan's FLOPs into the kernel's seconds)."""
    from adaptlab.plan import measure

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path))
    rate = measure.attention_throughput("cpu", precision, 2, 32, 3, 16, seconds=0.05)
    assert rate["attention_flops_per_s"] > 0 and rate["attention_shape"] == [2, 3, 32, 16]
    assert measure.attention_throughput("cpu", precision, 2, 32, 3, 16) == rate
    arch = arch_from_config(small_config())  # 1 layer, q_dim 8
    per_token = estimate.attention_flops_per_token(arch, 32)
    assert per_token * 2 * 32 == 3 * 2 * 2 * 1 * 32 * 32 * 8  # 3 x forward (2 B H T^2 d) for B=2, H=1, d=8


def test_attention_throughput_times_the_kernel_a_step_takes(tmp_path, monkeypatch):
    """On a CPU in bf16 from MIN_SEQ tokens a step's attention is cpu_attention's, elsewhere SDPA."""
    from adaptlab.cpu_attention import MIN_SEQ
    from adaptlab.plan import measure

    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path))
    kernel = {
        (precision, seq): measure.attention_throughput("cpu", precision, 1, seq, 2, 16, seconds=0.05)[
            "attention_kernel"
        ]
        for precision, seq in (("bf16", MIN_SEQ), ("bf16", MIN_SEQ // 2), ("fp32", MIN_SEQ))
    }
    assert kernel == {
        ("bf16", MIN_SEQ): "flash forward, matmul backward",
        ("bf16", MIN_SEQ // 2): "sdpa",
        ("fp32", MIN_SEQ): "sdpa",
    }


def test_a_bf16_checkpoint_loads_as_stored_for_qlora_and_leaves_no_mapped_pages():
    """QLoRA quantizes from the checkpoint's own dtype: a bf16 1B model's load peak is 2 bytes a parameter;
    a bf16 checkpoint loaded in fp32 is converted, so no mapped file pages stay resident."""
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    arch = arch_from_config(cfg)
    assert arch.stored_bytes == 2 and replace(arch, stored_bytes=4) != arch
    shape = Shape(1, 16, precision="fp32", device_type="cpu")
    qlora = Arm("qlora", 16, ALL)
    as_bf16 = memory_breakdown(arch, qlora, shape, 0)["peak"]
    as_fp32 = memory_breakdown(replace(arch, stored_bytes=4), qlora, shape, 0)["peak"]
    assert as_fp32 - as_bf16 == 2 * arch.total_params  # the load is the peak of so short a step
    # full fine-tuning loads in fp32 either way; only an fp32 checkpoint leaves its mapped pages behind
    full = memory_breakdown(arch, Arm("full"), shape, 0)
    mapped = memory_breakdown(replace(arch, stored_bytes=4), Arm("full"), shape, 0)
    assert full["loading"] == 0 and mapped["loading"] == round(
        estimate.CPU_LOAD_RESIDUAL * 4 * arch.total_params
    )
    assert mapped["peak"] - full["peak"] == mapped["loading"]
    # LoRA at bf16 loads a bf16 checkpoint's Linears as stored and widens the rest: its load holds those
    # weights (and on a CPU the widened tensors' file pages), never the whole base in fp32 ...
    assert arch.stored_bf16
    lora = Arm("lora", 16, ALL)
    cpu_bf16 = Shape(1, 16, precision="bf16", device_type="cpu")
    stored = memory_breakdown(arch, lora, cpu_bf16, 0)
    unheld = arch.total_params - arch.linear_params
    assert stored["weights"] == 2 * arch.linear_params + 4 * unheld
    assert stored["peak"] >= stored["weights"] + 2 * unheld
    # ... where a checkpoint in fp16 is loaded in fp32, the file's pages resident too: the peak here
    fp16 = memory_breakdown(replace(arch, stored_bf16=False), lora, cpu_bf16, 0)
    assert fp16["peak"] == (4 + 2) * arch.total_params
    gpu = memory_breakdown(replace(arch, stored_bf16=False), lora, replace(cpu_bf16, device_type="cuda"), 0)
    assert gpu["peak"] == 4 * arch.total_params  # the file's pages are host memory


# -- the memory check before `adaptlab train` ----------------------------------------------------


@pytest.mark.parametrize("task", ["sft", "dpo", "grpo"])
@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora"])
def test_default_runs_plan_well_inside_a_24gib_machine(task, method):
    """The check must never refuse a normal run: tiny-random and smollm2-135m at default sizes plan
    under 8 GiB, a third of that machine, in either precision."""
    from adaptlab.config import RunConfig
    from adaptlab.plan.fit import run_peak_bytes

    config = RunConfig.model_validate({"method": {"method": method}, "objective": {"task": task}})
    for arch in (load_arch("tiny-random"), arch_from_config(smollm2_config(), "smollm2-135m")):
        for precision in ("fp32", "bf16"):
            peak = run_peak_bytes(config, "cpu", precision, arch)
            assert 0 < peak < 8 * 2**30, (arch.spec, precision, peak / 2**30)


@pytest.mark.parametrize(
    ("run", "flag"),
    [
        ({"train": {"batch": 100_000_000}}, "--batch 100000000"),
        ({"train": {"seq_len": 2048, "batch": 50_000}}, "--batch 50000"),
        ({"objective": {"task": "grpo", "group_size": 2_000_000}}, "--group-size 2000000"),
        ({"objective": {"task": "grpo"}, "train": {"batch": 100_000_000}}, "--batch 100000000"),
        ({"objective": {"task": "grpo", "max_new_tokens": 1000, "prompts_per_step": 100_000}},
         "--prompts-per-step 100000"),
    ],
)  # fmt: skip
def test_a_run_beyond_the_memory_available_names_the_flag_to_lower(run, flag):
    from adaptlab.config import RunConfig
    from adaptlab.plan.fit import check_run_fits

    config = RunConfig.model_validate({"model": {"name": "tiny-random"}, **run})
    with pytest.raises(UserError) as err:
        check_run_fits(config, torch.device("cpu"), "fp32")
    message = str(err.value)
    assert message.startswith(f"{flag} needs about ") and "GiB available: lower " + flag.split()[0] in message
    assert message.endswith("or pass --no-memory-check") and "\n" not in message
    check_run_fits(RunConfig.model_validate({"model": {"name": "tiny-random"}}), torch.device("cpu"), "fp32")


def test_train_refuses_a_run_that_cannot_fit_before_writing_anything(run_cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{bad\n')
    for args, flag in (
        (["--batch", "100000000", "--data", "python-stdlib"], "--batch 100000000"),
        (["--task", "grpo", "--data", "arithmetic", "--group-size", "2000000"], "--group-size 2000000"),
    ):
        code, _, err = run_cli("train", "--model", "tiny-random", *args, "--out", tmp_path / "r")
        assert code == 2 and err.startswith(f"error: {flag} needs about "), err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists(), err
    # --no-memory-check starts the run: here it stops at the malformed data, past the check
    args = ["train", "--model", "tiny-random", "--batch", "100000000", "--data", bad, "--out", tmp_path / "r"]
    code, _, err = run_cli(*args, "--no-memory-check")
    assert code == 2 and "malformed JSON" in err and "needs about" not in err, err
