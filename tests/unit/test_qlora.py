"""QLoRA on tiny-random: NF4 against a reference quantizer, training, reload, merge cost, bad input."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from peft import PeftModel

from adaptlab.errors import UserError
from adaptlab.models import load_model, load_tuned
from adaptlab.quantize import (
    BLOCKSIZE,
    dequantize_weight,
    dequantized_state,
    load_qlora,
    merge_cost,
    merge_qlora,
    quantization_error,
    quantization_info,
    quantize_base,
)
from adaptlab.train import train

bnb = pytest.importorskip("bitsandbytes")

# The NF4 code of the QLoRA paper (Dettmers et al. 2023, appendix E): 16 levels, exact zero, [-1, 1].
NF4_TABLE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def nf4_levels_from_normal_quantiles() -> torch.Tensor:
    """NF4 by its definition: quantiles of N(0, 1), 8 positive and 7 negative, plus zero, scaled to [-1, 1]."""
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, as in the paper's construction
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


def reference_nf4_codes(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax NF4: per block of `blocksize` values, the nearest level to w / absmax.

    Returns (level index per value (N/blocksize, blocksize), absmax per block).
    """
    blocks = w.reshape(-1, blocksize).double()  # (n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
    normed = blocks / absmax
    idx = (normed.unsqueeze(-1) - NF4_TABLE.double()).abs().argmin(dim=-1)  # (n_blocks, blocksize)
    return idx, absmax.squeeze(1)


def test_nf4_levels_are_the_normal_quantile_code_and_bitsandbytes_uses_them():
    assert torch.allclose(nf4_levels_from_normal_quantiles(), NF4_TABLE, atol=1e-6)
    code = bnb.functional.get_4bit_type("nf4", device="cpu").float()
    assert torch.allclose(code, NF4_TABLE, atol=1e-7)


def _weights(tiny, kind: str) -> torch.Tensor:
    if kind == "tiny-random q_proj":
        return tiny.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    w[::7, ::11] *= 8.0  # outliers, so some blocks have a large absmax
    return w


@pytest.mark.parametrize("kind", ["tiny-random q_proj", "gaussian with outliers"])
def test_bitsandbytes_nf4_equals_the_reference_quantizer(tiny, kind):
    """Single quantization: bitsandbytes' dequantized values are exactly level * absmax of the reference."""
    w = _weights(tiny, kind)
    q, state = bnb.functional.quantize_4bit(
        w, blocksize=BLOCKSIZE, compress_statistics=False, quant_type="nf4"
    )
    deq = bnb.functional.dequantize_4bit(q, state).reshape(-1, BLOCKSIZE).double()  # (n_blocks, blocksize)
    idx, absmax = reference_nf4_codes(w)
    reference = NF4_TABLE.double()[idx] * absmax[:, None]
    assert torch.allclose(deq, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["tiny-random q_proj", "gaussian with outliers"])
def test_quantize_base_is_nf4_with_double_quantized_absmax(tiny, kind):
    """quantize_base's weights: the reference levels, times absmax stored in 8 bits (double quantization)."""
    w = _weights(tiny, kind)
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    holder = torch.nn.Sequential(linear)
    quantize_base(holder)
    assert isinstance(holder[0], bnb.nn.Linear4bit)
    assert holder[0].weight.quant_state.nested and holder[0].weight.quant_state.blocksize == BLOCKSIZE
    deq = dequantize_weight(holder[0]).reshape(-1, BLOCKSIZE).double()  # (n_blocks, blocksize)
    idx, absmax = reference_nf4_codes(w)
    # The value at a block's absmax always maps to level +-1, so the stored absmax is the block's max |deq|.
    stored = deq.abs().amax(dim=1)
    assert torch.allclose(deq, NF4_TABLE.double()[idx] * stored[:, None], rtol=1e-6, atol=1e-7)
    # Double quantization: absmax - mean in an 8-bit dynamic code per group of 256 blocks (one group here);
    # its error stays under 1% of the group's largest |absmax - mean| (seen: 0.7%).
    assert (stored - absmax).abs().max() <= 0.01 * (absmax - absmax.mean()).abs().max()
    rel = float((deq.reshape(w.shape) - w).norm() / w.norm())
    if kind == "tiny-random q_proj":  # Gaussian init: NF4's round trip error is ~0.092 on Gaussian weights
        assert 0.085 < rel < 0.10
        errors = quantization_error(tiny.model)["modules"]
        assert errors["model.layers.0.self_attn.q_proj"] == pytest.approx(rel, rel=1e-5)


def test_quantize_base_swaps_linears_but_not_head_or_embeddings():
    model = load_model("tiny-random").model
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    quantize_base(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q k v o gate up down in each of 2 layers
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    assert not any(p.requires_grad for p in model.parameters())
    info = quantization_info(model)
    assert info["backend"] == "bitsandbytes" and info["version"] == bnb.__version__
    assert (info["quant_type"], info["double_quant"], info["blocksize"]) == ("nf4", True, 64)
    # The 4-bit model computes with its dequantized weights: same logits as a plain model holding them.
    after = model(ids).logits
    assert not torch.allclose(after, before)
    state = dequantized_state(model)
    assert sorted(state) == sorted(quantized)
    plain = load_model("tiny-random").model
    for name, module in plain.named_modules():
        if name in state:
            module.weight.data.copy_(state[name])
    assert torch.allclose(plain(ids).logits, after, atol=1e-5)


def _checkpoint_maps() -> list[tuple[int, int]]:
    """Address ranges of memory-mapped safetensors files in this process."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantized_base_keeps_nothing_in_the_checkpoint_map():
    """The fp32 checkpoint's pages must not stay resident once its Linears are 4-bit (memory goal)."""
    model = load_model("tiny-random").model
    in_map = [
        n
        for n, p in model.named_parameters()
        if any(lo <= p.data_ptr() < hi for lo, hi in _checkpoint_maps())
    ]
    assert in_map, "the loader no longer maps the checkpoint: this test checks nothing"
    quantize_base(model)
    gc.collect()
    left = [
        n
        for n, t in [*model.named_parameters(), *model.named_buffers()]
        if any(lo <= t.data_ptr() < hi for lo, hi in _checkpoint_maps())
    ]
    assert left == []


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """One short QLoRA run on a repetitive corpus (so the loss must fall), with the trained model kept."""
    root = tmp_path_factory.mktemp("qlora")
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as fh:
        for i in range(20):
            fh.write(
                json.dumps({"text": f"doc {i}: " + "the quick brown fox jumps over the lazy dog. " * 20})
                + "\n"
            )
    captured = {}

    def on_start(setup):
        captured["setup"] = setup
        captured["packed"] = {
            n: m.weight.data.clone()
            for n, m in setup.model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)
        }

    cfg = tiny_config(corpus, root / "run", method="qlora", steps=10, lr=2e-2, rank=8, warmup=0.0)
    summary = train(cfg, on_start=on_start)
    return root / "run", summary, captured


def test_qlora_trains_and_records_its_quantization(qlora_run):
    run, summary, captured = qlora_run
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.3, losses
    assert summary["method"] == "qlora"
    assert summary["quantization"] == {
        "backend": "bitsandbytes",
        "version": bnb.__version__,
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": 64,
        "compute_dtype": "float32",
    }
    assert json.loads((run / "summary.json").read_text())["quantization"] == summary["quantization"]
    # Only the adapters trained; the 4-bit base is bit-for-bit what it was.
    model = captured["setup"].model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    now = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert now.keys() == captured["packed"].keys()
    assert all(torch.equal(now[n], captured["packed"][n]) for n in now)


def test_qlora_adapter_reloads_with_identical_logits(qlora_run):
    run, _, captured = qlora_run
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))
    trained = captured["setup"].model.eval()
    with torch.inference_mode():
        expected = trained(input_ids=ids).logits
    # adaptlab's loader (run dir and RUN/adapter) quantizes the base as in training.
    for path in (run, run / "adapter"):
        loaded, ref = load_tuned(path)
        assert ref.kind == "adapter"
        assert quantization_info(loaded.model) is not None
        with torch.inference_mode():
            assert torch.equal(loaded.model(input_ids=ids).logits, expected)
    # A normal PEFT adapter: PeftModel.from_pretrained onto a base quantized the same way.
    base = quantize_base(load_model("tiny-random").model)
    peft_model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    with torch.inference_mode():
        assert torch.equal(peft_model(input_ids=ids).logits, expected)


def _batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :4] = -100
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]


def test_merge_into_dequantized_base_is_exact_and_full_base_shows_the_cost(qlora_run):
    run, _, _ = qlora_run
    adapter = run / "adapter"
    unmerged = load_qlora("tiny-random", adapter)
    exact, report = merge_qlora("tiny-random", adapter, into="dequantized")
    assert report["into"] == "dequantized" and not report["requantized"]
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in exact.modules())
    assert not any("lora_" in n for n, _ in exact.named_parameters())
    cost = merge_cost(unmerged, exact, _batches())
    assert cost["tokens"] == 2 * (23 - 3)  # next-token targets 1..23, of which 1..3 are masked
    assert cost["max_abs_logit_diff"] < 1e-4
    assert abs(cost["nll_diff"]) < 1e-5

    full, report = merge_qlora("tiny-random", adapter, into="full")
    assert report["into"] == "full" and "full-precision" in report["description"]
    cost_full = merge_cost(unmerged, full, _batches())
    assert cost_full["max_abs_logit_diff"] > 1e-3  # the base quantization error, now visible
    assert cost_full["nll_merged"] == pytest.approx(cost_full["nll_unmerged"] + cost_full["nll_diff"])

    requantized, report = merge_qlora("tiny-random", adapter, into="dequantized", requantize=True)
    assert report["requantized"] and "re-quantized" in report["description"]
    assert quantization_info(requantized)["quant_type"] == "nf4"
    cost_rq = merge_cost(unmerged, requantized, _batches())
    assert cost_rq["max_abs_logit_diff"] > cost["max_abs_logit_diff"]


def test_merge_bad_input_is_one_clear_error(qlora_run):
    run, _, _ = qlora_run
    with pytest.raises(UserError, match="choose one of full, dequantized"):
        merge_qlora("tiny-random", run / "adapter", into="halfway")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="--into dequantized"):
        merge_qlora("tiny-random", run / "adapter", into="full", requantize=True)
    with pytest.raises(UserError, match="no text"):
        merge_cost(torch.nn.Identity(), torch.nn.Identity(), [])


def test_qlora_bad_targets_via_cli_is_one_line(tmp_path, run_cli):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train", "--model", "tiny-random", "--method", "qlora", "--targets", "nope_proj",
        "--data", corpus, "--steps", "1", "--seq-len", "16", "--out", out, "--quiet",
    )  # fmt: skip
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "nope_proj" in lines[0] and "q_proj" in lines[0]
    assert not (out / "summary.json").exists()
