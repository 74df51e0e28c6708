"""merge and combine on tiny-random with real peft adapters (random nonzero B, so each adapter changes outputs)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from adaptlab.errors import UserError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = "The committee met on Tuesday to review the budget. def f(x): return x * 2"


def make_adapter(out: Path, seed: int, targets: list[str] | None = None, r: int = 8, **lora: object) -> Path:
    """Save a peft LoRA adapter for tiny-random with random A and B; its config names the base 'tiny-random'."""
    from peft import LoraConfig, get_peft_model

    from adaptlab.models import load_model

    base = load_model("tiny-random").model
    torch.manual_seed(seed)
    config = LoraConfig(r=r, target_modules=targets or ["q_proj", "v_proj"], init_lora_weights=False, **lora)
    get_peft_model(base, config).save_pretrained(out)
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "tiny-random"
    path.write_text(json.dumps(cfg))
    return out


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    enc = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return model(**enc).logits[0]


def base_plus(adapters: list[Path]):
    """A fresh tiny-random with the adapters attached (first one active)."""
    from peft import PeftModel

    from adaptlab.models import load_model

    loaded = load_model("tiny-random")
    model = PeftModel.from_pretrained(loaded.model, str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    return model.eval(), loaded.tokenizer


# -- merge ---------------------------------------------------------------------------------------


def test_merge_writes_plain_model_matching_base_plus_adapter(tmp_path, run_cli, tiny):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tmp_path / "ad", seed=1, targets=ALL_LINEAR)
    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", "--adapter", adapter, "--out", out)
    assert code == 0, stderr
    assert "max |logit difference|" in stdout
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not list(out.glob("*.bin")) and (out / "tokenizer.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    unmerged, tok = base_plus([adapter])
    diff = (logits(merged, tok) - logits(unmerged, tok)).abs().max().item()
    assert diff < 1e-4
    # the adapter really changed the model, so the comparison above is not trivially true
    assert (logits(merged, tok) - logits(tiny.model, tok)).abs().max().item() > 1e-2
    report = json.loads((out / "adaptlab_merge.json").read_text())
    assert report["max_abs_diff"] < 1e-4 and report["tokens_checked"] > 20 and report["base"] == "tiny-random"


def test_merge_from_run_dir_and_qlora_needs_into(tmp_path, run_cli):
    run = tmp_path / "run"
    make_adapter(run / "adapter", seed=2)
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name": "tiny-random"}, "method": {"name": "qlora"}})
    )
    (run / "summary.json").write_text(json.dumps({"method": "qlora", "base_model": "tiny-random"}))
    code, _, err = run_cli("merge", "--adapter", run, "--out", tmp_path / "m1")
    assert code == 2 and "--into full" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("merge", "--adapter", run, "--out", tmp_path / "m2", "--into", "dequantized")
    assert code == 0, err  # merged into the NF4 round trip of the base, checked against it unmerged
    code, out, err = run_cli("merge", "--adapter", run, "--out", tmp_path / "m3", "--into", "full")
    assert code == 0, err
    assert json.loads((tmp_path / "m3" / "adaptlab_merge.json").read_text())["method"] == "qlora"
    from safetensors.torch import load_file

    deq, full = (
        load_file(str(tmp_path / "m2" / "model.safetensors")),
        load_file(str(tmp_path / "m3" / "model.safetensors")),
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    rel = ((deq[q] - full[q]).norm() / full[q].norm()).item()
    assert 0.02 < rel < 0.2  # the two merges differ by the NF4 round-trip error of the base


def test_merge_failed_check_writes_nothing(tmp_path):
    from adaptlab.adapters import merge_adapter

    adapter = make_adapter(tmp_path / "ad", seed=3)
    with pytest.raises(UserError, match="nothing written"):
        merge_adapter(adapter, tmp_path / "out", tolerance=0.0)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp dir left behind


def test_merge_bad_inputs_exit_2_with_one_line(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adaptlab.models import save_model

    good = make_adapter(tmp_path / "good", seed=4)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    # an adapter made for another base: a Llama with hidden size 32
    from peft import LoraConfig, get_peft_model

    other = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "foreign")
    full = save_model("tiny-random", tmp_path / "full")
    cases = [
        (("--adapter", tmp_path / "missing", "--out", tmp_path / "o1"), "no such file"),
        (("--adapter", good, "--out", busy), "not empty"),
        (
            ("--adapter", tmp_path / "foreign", "--base", "tiny-random", "--out", tmp_path / "o2"),
            "does not fit",
        ),
        (("--adapter", tmp_path / "foreign", "--out", tmp_path / "o3"), "record"),
        (("--adapter", full, "--out", tmp_path / "o4"), "not an adapter"),
        (("--adapter", good, "--out", tmp_path / "o5", "--into", "dequantized"), "for QLoRA adapters"),
    ]
    for args, expected in cases:
        code, out, err = run_cli("merge", *args)
        assert code == 2, (args, err)
        assert expected in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err


def test_merge_and_combine_refuse_an_out_another_writer_holds(tmp_path, run_cli):
    from adaptlab import outputs

    adapters = [make_adapter(tmp_path / f"ad{i}", seed=10 + i) for i in range(2)]
    out = tmp_path / "out"
    with outputs.owned(out, "artifact"):  # what a merge or combine holds while it writes `out`
        for cmd in (
            ("merge", "--adapter", adapters[0]),
            ("combine", "--adapter", adapters[0], "--adapter", adapters[1]),
        ):
            code, _, err = run_cli(*cmd, "--out", out)
            assert code == 2 and len(err.strip().splitlines()) == 1, err
            assert f"{out} is in use by pid {os.getpid()}" in err
        assert sorted(p.name for p in out.iterdir()) == [outputs.MARKER, outputs.LOCK]  # nothing written
    # the holder is gone: its marker and lock do not block the output
    code, _, err = run_cli("merge", "--adapter", adapters[0], "--out", out)
    assert code == 0, err
    assert (out / "model.safetensors").exists() and (out / "adaptlab_merge.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


# -- combine -------------------------------------------------------------------------------------


def _deltas(model, name: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {
        n: m.get_delta_weight(name)
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and name in m.lora_A
    }


@pytest.mark.parametrize("rslora", [False, True])
def test_combine_cat_is_the_weighted_sum_of_deltas(tmp_path, rslora):
    """cat with weights w: the combined delta W is exactly sum_i w_i dW_i (also for rsLoRA sources)."""
    from adaptlab.adapters import combine_adapters

    kw = {"lora_alpha": 16, "use_rslora": rslora}
    a = make_adapter(tmp_path / "a", seed=5, targets=["q_proj", "up_proj"], **kw)
    b = make_adapter(tmp_path / "b", seed=6, targets=["q_proj", "up_proj"], r=4, **kw)
    report = combine_adapters([a, b], tmp_path / "ab", weights=[1.0, 0.5], how="cat")
    assert report.nll == {}
    model, _ = base_plus([a, b, tmp_path / "ab"])
    da, db, dc = _deltas(model, "a0"), _deltas(model, "a1"), _deltas(model, "a2")
    assert set(dc) == set(da) and len(dc) == 4
    for name in dc:
        torch.testing.assert_close(dc[name], da[name] + 0.5 * db[name], rtol=1e-5, atol=1e-6)
    assert (
        json.loads((tmp_path / "ab" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "tiny-random"
    )


def test_combine_cli_evaluates_each_domain_and_general(tmp_path, run_cli, tiny):
    from adaptlab.adapters import mean_nll

    a = make_adapter(tmp_path / "legal", seed=7)
    b = make_adapter(tmp_path / "systems", seed=8)
    legal = tmp_path / "legal.jsonl"
    legal.write_text(
        "".join(
            json.dumps({"id": i, "text": f"Licence clause {i}: the licensee may copy."}) + "\n"
            for i in range(5)
        )
    )
    systems = tmp_path / "systems.jsonl"
    systems.write_text(
        "".join(json.dumps({"text": f"open(2) returns file descriptor {i}."}) + "\n" for i in range(5))
    )
    general = tmp_path / "general.txt"
    general.write_text("A dog is a domesticated animal.\n\nThe sun rises in the east.\n")
    out = tmp_path / "combined"
    code, stdout, err = run_cli(
        "combine", "--adapter", a, "--adapter", b, "--how", "linear", "--weights", "0.5,0.5",
        "--data", legal, "--data", systems, "--general", general, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "interference on legal" in stdout and "interference on systems" in stdout
    report = json.loads((out / "adaptlab_combine.json").read_text())
    assert set(report["nll"]) == {"base", "legal", "systems", "combined"}
    assert report["datasets"] == ["legal", "systems", "general"]
    assert report["domain_of"] == {"legal": "legal", "systems": "systems"}
    # the base row is the base model, scored by the same helper
    texts = [json.loads(line)["text"] for line in legal.read_text().splitlines()]
    assert report["nll"]["base"]["legal"] == pytest.approx(
        mean_nll(tiny.model, tiny.tokenizer, texts), rel=1e-6
    )
    values = [v for row in report["nll"].values() for v in row.values()]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert report["nll"]["combined"]["legal"] != report["nll"]["base"]["legal"]
    assert (out / "adapter_model.safetensors").exists() and not (out / "combined").exists()


def test_combine_ties_and_bad_inputs(tmp_path, run_cli):
    a = make_adapter(tmp_path / "a", seed=9)
    b = make_adapter(tmp_path / "b", seed=10)
    c4 = make_adapter(tmp_path / "c4", seed=11, r=4)
    code, _, err = run_cli(
        "combine",
        "--adapter",
        a,
        "--adapter",
        b,
        "--how",
        "ties",
        "--density",
        "0.5",
        "--out",
        tmp_path / "t",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "t" / "adaptlab_combine.json").read_text())["density"] == 0.5
    cases = [
        (("--adapter", a, "--out", tmp_path / "o1"), "at least two"),
        (("--adapter", a, "--adapter", b, "--weights", "1", "--out", tmp_path / "o2"), "one per adapter"),
        (("--adapter", a, "--adapter", b, "--weights", "x,y", "--out", tmp_path / "o3"), "comma-separated"),
        (("--adapter", a, "--adapter", b, "--density", "0.3", "--out", tmp_path / "o4"), "ties only"),
        (("--adapter", a, "--adapter", c4, "--how", "linear", "--out", tmp_path / "o5"), "same r"),
        (
            ("--adapter", a, "--adapter", b, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "o6"),
            "no such file",
        ),
    ]
    for args, expected in cases:
        code, _, err = run_cli("combine", *args)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (args, err)


@pytest.mark.parametrize("weights", ["nan,1", "1,inf", "-inf,0.5"])
def test_combine_refuses_non_finite_weights(tmp_path, run_cli, weights):
    a = make_adapter(tmp_path / "a", seed=9)
    b = make_adapter(tmp_path / "b", seed=10)
    code, _, err = run_cli(
        "combine", "--adapter", a, "--adapter", b, "--weights", weights, "--out", tmp_path / "o"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--weights" in err and "finite" in err
    assert not (tmp_path / "o").exists()


# -- an adapter with NaN or inf weights ----------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_an_adapter_with_non_finite_weights_is_one_line_in_every_command(tmp_path, run_cli, bad):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter(tmp_path / "ad", seed=12)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key][3, 1] = bad
    save_file(tensors, str(weights), metadata={"format": "pt"})
    commands = [
        ("merge", "--adapter", adapter, "--out", tmp_path / "merged"),
        ("analyze", "--tuned", adapter, "--base", "tiny-random", "--out", tmp_path / "analysis"),
        ("export", adapter, "--out", tmp_path / "gguf"),
        (
            "eval",
            "--model",
            "tiny-random",
            "--adapter",
            adapter,
            "--data",
            "python-stdlib",
            "--max-docs",
            "2",
        ),
        ("generate", "--model", "tiny-random", "--adapter", f"ad={adapter}", "--prompt", "hi"),
        (
            "combine",
            "--adapter",
            adapter,
            "--adapter",
            make_adapter(tmp_path / "ok", 13),
            "--out",
            tmp_path / "c",
        ),
    ]
    for args in commands:
        code, _, err = run_cli(*args)
        lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, err)
        assert f"adapter {weights} holds non-finite weights" in lines[0] and key in lines[0], (args, err)
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("ad", "ok")] == []  # nothing written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_non_finite_check_reads_every_float_dtype(tmp_path, dtype):
    from safetensors.torch import save_file

    from adaptlab.artifacts import check_finite

    largest = torch.finfo(dtype).max  # finite, with every exponent bit but one set
    tensors = {"a.lora_A.weight": torch.tensor([[largest, -largest, 0.0]], dtype=dtype),
               "steps": torch.tensor([7], dtype=torch.int64)}  # fmt: skip
    for i, bad in enumerate([None, math.nan, math.inf, -math.inf]):
        weights = tmp_path / f"{i}.safetensors"
        if bad is not None:
            tensors["a.lora_A.weight"][0, 2] = bad
        save_file(tensors, str(weights))
        if bad is None:
            check_finite(weights)
        else:
            with pytest.raises(UserError, match=r"non-finite weights \(NaN or inf in a\.lora_A\.weight\)"):
                check_finite(weights)


# -- NLL helper and text reading -----------------------------------------------------------------


def test_mean_nll_is_what_eval_reports(tiny):
    """combine scores text as `adaptlab eval` does, so its NLL can be read next to eval's."""
    from adaptlab.adapters import mean_nll
    from adaptlab.evaluate import evaluate

    texts = ["A short one.", "A much longer sentence, so the batch needs padding on the short one."]
    expected = evaluate(tiny.model, tiny.tokenizer, target_docs=texts, seq_len=256, batch_size=2)["target"][
        "nll"
    ]
    assert mean_nll(tiny.model, tiny.tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-9)


def test_read_texts_formats_and_errors(tmp_path):
    from adaptlab.adapters import read_texts

    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert read_texts(good) == ["one", "two", "three"] and read_texts(good, limit=2) == ["one", "two"]
    txt = tmp_path / "a.txt"
    txt.write_text("para one\nline\n\n\npara two\n")
    assert read_texts(txt) == ["para one\nline", "para two"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "x", "response": "y"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:1: no string `text` field \(found: prompt, response\)"):
        read_texts(bad)
    csv = tmp_path / "c.csv"
    csv.write_text("x")
    with pytest.raises(UserError, match="expected a .jsonl"):
        read_texts(csv)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_merge_refuses_a_tolerance_that_is_not_finite(tmp_path, run_cli, value):
    adapter = make_adapter(tmp_path / "ad", seed=5)
    code, _, err = run_cli("merge", "--adapter", adapter, "--out", tmp_path / "out", "--tolerance", value)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "--tolerance" in line and "finite" in line, line
    assert not (tmp_path / "out").exists()
