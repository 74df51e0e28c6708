"""QLoRA on tiny-random: NF4 against a reference quantizer, both of bitsandbytes' CPU layouts, training,
reload, merge, bad input.

bitsandbytes repacks a 4-bit weight for its avx512_bf16 kernel on such CPUs. These tests put modules
into that layout on any CPU (its conversion is plain torch), or make bitsandbytes believe the CPU
has avx512_bf16, so both layouts are exercised on every machine. Tolerances: a weight read back from
the repacked layout is within 2**-8 relative of the original (its absmax is kept in bf16); logits of
a model turned back from it within 1e-2 (seen 2.2e-3); everything adaptlab computes on an
avx512_bf16 CPU is bit-identical to an avx2 CPU (the repacking is turned off).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import pefts_forward, tiny_config
from peft import PeftModel

from adaptlab.adapters import merge_adapter
from adaptlab.artifacts import load_tuned
from adaptlab.errors import UserError
from adaptlab.models import load_model
from adaptlab.quantize import (
    BLOCKSIZE,
    dequantize_weight,
    dequantized_state,
    is_cpu_packed,
    keep_canonical_layout,
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


def test_quantizing_from_a_bf16_checkpoint_as_loaded_equals_quantizing_its_fp32_upcast(tmp_path):
    """QLoRA loads a checkpoint in its own dtype (STORED) and quantizes from there: the same 4-bit codes,
    scales and fp32 remaining weights as an fp32 load, without the whole model ever in fp32."""
    from adaptlab.models import STORED

    tiny = load_model("tiny-random")
    tiny.model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    tiny.tokenizer.save_pretrained(tmp_path / "bf16")
    stored = load_model(str(tmp_path / "bf16"), dtype=STORED).model
    assert {p.dtype for p in stored.parameters()} == {torch.bfloat16}
    upcast = quantize_base(load_model(str(tmp_path / "bf16")).model)
    quantize_base(stored)
    a, b = stored.state_dict(), upcast.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert {p.dtype for n, p in stored.named_parameters() if "norm" in n or "embed" in n} == {torch.float32}
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stored(ids).logits, upcast(ids).logits)


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
    with torch.inference_mode(), pefts_forward(trained):
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


@torch.inference_mode()
def _logits_and_nll(model: torch.nn.Module) -> tuple[torch.Tensor, float]:
    """Next-token logits (B, T-1, vocab) and mean NLL per scored token on _batches()."""
    batch = _batches()[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return logits.float(), float(nll)


def _written(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_merge_into_dequantized_base_is_exact_and_full_base_shows_the_cost(qlora_run, tmp_path):
    """`adaptlab merge --into dequantized` reproduces the 4-bit model as trained; --into full does not."""
    run, _, _ = qlora_run
    unmerged, _ = load_tuned(run)
    want, want_nll = _logits_and_nll(unmerged.model)

    report = merge_adapter(run, tmp_path / "deq", into="dequantized")
    assert (report.into, report.method) == ("dequantized", "qlora")
    exact = _written(tmp_path / "deq")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in exact.modules())
    got, got_nll = _logits_and_nll(exact)
    assert (got - want).abs().max() < 1e-4
    assert abs(got_nll - want_nll) < 1e-5

    merge_adapter(run, tmp_path / "full", into="full")
    full, full_nll = _logits_and_nll(_written(tmp_path / "full"))
    assert (full - want).abs().max() > 1e-3  # the base quantization error, now visible
    assert full_nll != pytest.approx(want_nll, abs=1e-6)


def test_merge_bad_input_is_one_clear_error(qlora_run, tmp_path):
    run, _, _ = qlora_run
    with pytest.raises(UserError, match="choose one of full, dequantized"):
        merge_adapter(run, tmp_path / "a", into="halfway")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="choose --into full"):
        merge_adapter(run, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# bitsandbytes' avx512_bf16 CPU layout, exercised on any CPU


def _force_cpu_layout(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Repack every Linear4bit as bitsandbytes does on an avx512_bf16 CPU's first inference forward."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    modules = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in modules:
        m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu(
            m.weight.data, m.weight.quant_state
        )
        m.quant_state = m.weight.quant_state
    assert modules and all(is_cpu_packed(m) for m in modules)
    return modules


@pytest.fixture
def avx512_cpu(monkeypatch):
    """bitsandbytes believes this CPU has avx512_bf16 (Linear4bit reads it when built)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def test_dequantize_weight_reads_the_cpu_packed_layout():
    model = quantize_base(load_model("tiny-random").model)
    before = dequantized_state(model)
    modules = _force_cpu_layout(model)
    after = dequantized_state(model)
    assert sorted(after) == sorted(before)
    for name in before:  # only absmax changed: rounded to bf16 (8 significant bits)
        assert torch.allclose(after[name], before[name], rtol=2**-8, atol=0), name
    # Reading the repacked bytes as the original layout, as bitsandbytes' own dequantize_4bit does, is wrong.
    name = next(n for n in before if n.endswith("layers.0.self_attn.q_proj"))
    naive = bnb.functional.dequantize_4bit(modules[0].weight.data, modules[0].weight.quant_state).float()
    assert not torch.allclose(naive.reshape(before[name].shape), before[name], atol=1e-2)


def test_keep_canonical_layout_turns_a_repacked_model_back():
    model = quantize_base(load_model("tiny-random").model)
    want, _ = _logits_and_nll(model)
    modules = _force_cpu_layout(model)
    packed = [dequantize_weight(m) for m in modules]
    assert keep_canonical_layout(model) == len(modules)
    assert not any(is_cpu_packed(m) for m in modules)
    assert all(torch.equal(dequantize_weight(m), w) for m, w in zip(modules, packed, strict=True))
    got, _ = _logits_and_nll(model)
    assert (got - want).abs().max() < 1e-2
    assert keep_canonical_layout(model) == 0


def test_an_avx512_cpu_computes_what_an_avx2_cpu_does(avx512_cpu):
    """Without keep_canonical_layout, the first inference forward repacks (and on avx2 computes garbage)."""
    plain = quantize_base(load_model("tiny-random").model)
    plain.eval()
    with torch.inference_mode():
        ids = _batches()[0]["input_ids"]
        first, second = plain(ids).logits, plain(ids).logits
    modules = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not any(is_cpu_packed(m) for m in modules)
    assert torch.equal(first, second)
    for m in modules:
        m.support_avx512bf16_for_cpu = True  # bitsandbytes left alone: the checks above would fail
    with torch.inference_mode():
        repacked = plain(ids).logits
    assert all(is_cpu_packed(m) for m in modules)
    assert not torch.equal(repacked, first)


def test_qlora_run_reloads_and_merges_the_same_on_an_avx512_cpu(qlora_run, avx512_cpu, tmp_path):
    run, _, captured = qlora_run
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode(), pefts_forward(captured["setup"].model.eval()) as trained:
        expected = trained(input_ids=ids).logits
        loaded, _ = load_tuned(run)
        for _ in range(2):  # the first inference forward is where bitsandbytes would repack
            assert torch.equal(loaded.model(input_ids=ids).logits, expected)
    merge_adapter(run, tmp_path / "deq", into="dequantized")
    with torch.inference_mode():
        merged = _written(tmp_path / "deq")(input_ids=ids).logits
    assert (merged - expected).abs().max() < 1e-4


def test_bitsandbytes_kernels_warning_is_dropped():
    """bitsandbytes logs it while being imported (peft imports it) on avx512_bf16 CPUs without `kernels`;
    with `kernels` installed and the Hub offline, `kernels` logs its skipped trust check on the same fetch.
    Both go, in the environment the suite runs in (offline), other warnings stay."""
    import subprocess

    script = (
        "import logging, adaptlab.models, peft\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
        "you already `pip install kernels` and the kernels >= 0.11.1', 'No module named kernels')\n"
        "log.warning('another bitsandbytes warning')\n"
        "logging.getLogger('kernels._internals.hf_hub').warning(\"Skipping publisher trust check for "
        "'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in offline mode.\")\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == ["another bitsandbytes warning"]


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
