"""`adaptlab eval` end to end on tiny-random: base alone, a PEFT adapter, a full model, bad flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch

DOCS = [
    {"id": f"d{i}", "text": f"Document {i}: kettles boil water, and rivers run to the sea number {i}."}
    for i in range(6)
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        copy.deepcopy(tiny.model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_base_alone_prints_a_table(run_cli, data_file):
    code, out, err = run_cli("eval", "--model", "tiny-random", "--data", data_file, "--split", "all")
    assert code == 0, err
    assert "target nll" in out and "target bpb" in out


def test_adapter_json_has_base_delta_and_drift(run_cli, data_file, adapter_dir, tmp_path):
    target = tmp_path / "figures.json"
    code, out, err = run_cli(
        "eval", "--model", "tiny-random", "--adapter", adapter_dir, "--data", data_file, "--split", "all",
        "--drift", data_file, "--max-docs", "3", "--seq-len", "64", "--out", target,
    )  # fmt: skip
    assert code == 0, err
    assert "LoRA-family adapter (PEFT)" in err
    result = json.loads(target.read_text())
    t = result["target"]
    assert t["docs"] == 3 and t["tokens"] == t["base"]["tokens"]
    assert t["delta"]["ci95"][0] <= t["delta"]["nll"] <= t["delta"]["ci95"][1]
    assert result["drift"]["source"] == "data" and result["drift"]["kl"] > 0
    assert result["tuned"]["kind"] == "adapter"
    assert "delta [95% CI]" in out  # the table is printed too


def test_full_model_is_compared_with_its_base(run_cli, tiny, data_file, tmp_path):
    full = copy.deepcopy(tiny.model)
    with torch.no_grad():
        full.model.norm.weight.mul_(1.2)
    full.save_pretrained(tmp_path / "full")
    tiny.tokenizer.save_pretrained(tmp_path / "full")
    code, out, err = run_cli(
        "eval", "--model", "tiny-random", "--tuned", tmp_path / "full", "--data", data_file,
        "--split", "all", "--json", "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    assert "full model (HF)" in err
    t = json.loads(out)["target"]
    assert t["nll"] != t["base"]["nll"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "tiny-random"], "nothing to evaluate"),
        (["--model", "tiny-random", "--drift"], "--adapter or --tuned"),
        (["--model", "tiny-random", "--adapter", "x", "--tuned", "y", "--mc", "z"], "Can't provide both"),
        (["--model", "tiny-random", "--mc", "/no/such.jsonl"], "no such file"),
        (["--model", "tiny-random", "--adapter", "/no/such/run", "--mc", "z"], "no such file or directory"),
    ],
)
def test_bad_flags_exit_2(run_cli, args, message):
    code, out, err = run_cli("eval", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


class _Touch:
    """Unpickling this creates `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.path,))


def test_pickle_weights_are_refused_in_one_line_and_never_loaded(
    run_cli, data_file, adapter_dir, tiny, tmp_path
):
    import pickle
    import shutil

    marker = tmp_path / "unpickled"
    bin_adapter = tmp_path / "bin_adapter"
    bin_adapter.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", bin_adapter)
    (bin_adapter / "adapter_model.bin").write_bytes(pickle.dumps({"w": _Touch(marker)}))
    bin_model = tmp_path / "bin_model"
    tiny.model.config.save_pretrained(bin_model)
    (bin_model / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Touch(marker)}))
    for flag, path in (("--adapter", bin_adapter), ("--tuned", bin_model), ("--model", bin_model)):
        args = ["--model", "tiny-random", flag, path] if flag != "--model" else [flag, path]
        code, _, err = run_cli("eval", *args, "--data", data_file, "--split", "all")
        assert code == 2, (flag, err)
        assert len(err.strip().splitlines()) == 1 and "safetensors only" in err, err
    assert not marker.exists()


def test_eval_and_compare_give_the_same_target_nll_for_a_qlora_run(run_cli, tmp_path):
    """Both score the adapter on the NF4 base it was trained on (artifacts.load_tuned)."""
    from helpers import tiny_config, write_corpus

    from adaptlab.compare.evaluation import evaluate_run, load_probes
    from adaptlab.compare.spec import CompareSpec
    from adaptlab.train import train

    data_file = write_corpus(tmp_path / "data", n_docs=20)
    run = tmp_path / "run"
    train(tiny_config(data_file, run, method="qlora", steps=6, lr=1e-2))
    spec = CompareSpec.model_validate(
        {
            "model": "tiny-random",
            "data": {"train": [str(data_file)]},
            "tokens": 1000,
            "drift": False,
            "general": [str(data_file)],
            "eval": {"seq_len": 64, "batch": 4, "max_docs": 2},
            "arms": [{"name": "run", "method": "qlora"}],
        }
    )
    compared = evaluate_run(spec, run, load_probes(spec), lambda event: None)["target"]
    code, out, err = run_cli(
        "eval", "--adapter", run, "--data", data_file, "--split", "test", "--max-docs", "2", "--seq-len", "64", "--batch", "4",
        "--json", "--no-cache",
    )  # fmt: skip
    assert code == 0, err
    evaluated = json.loads(out)["target"]
    assert evaluated["tokens"] == compared["tokens"] > 0
    assert evaluated["nll"] == pytest.approx(compared["nll"], abs=1e-6)
    assert evaluated["base"]["nll"] == pytest.approx(compared["base"]["nll"], abs=1e-6)


@pytest.mark.parametrize(
    "args,parent",
    [
        (["--task-k", "2"], "--task"),
        (["--task-reward", "exact"], "--task"),
        (["--harness-limit", "3"], "--harness"),
        (["--drift-tokens", "8"], "--drift"),
    ],
)
def test_a_flag_without_the_evaluation_it_shapes_is_one_line(run_cli, args, parent) -> None:
    code, _, err = run_cli(
        "eval", "--model", "tiny-random", "--data", "python-stdlib", "--max-docs", "1", *args
    )
    assert code == 2 and f"{args[0]} applies to {parent}" in err and len(err.strip().splitlines()) == 1, err
