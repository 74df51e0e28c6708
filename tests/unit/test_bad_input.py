"""Every user mistake ends in one line on stderr, exit code 2, no traceback, no finished-looking run."""

from __future__ import annotations

import pytest
from helpers import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


BASE = ["train", "--model", "tiny-random", "--steps", "1", "--batch", "1", "--seq-len", "16", "--quiet"]


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (["--method", "nope"], "nope"),
        (["--targets", "attn_only"], "q_proj"),  # lists the modules that exist
        (["--targets", "q_proj,nothing"], "nothing"),
        (["--rank", "0"], "rank"),
        (["--steps", "0"], "steps"),
        (["--steps", "2", "--tokens", "100"], "both"),
    ],
)
def test_bad_flags(run_cli, corpus, tmp_path, extra, expect):
    args = [*BASE, "--data", corpus, "--out", tmp_path / "run", *extra]
    code, _, err = run_cli(*args)
    assert code == 2
    assert expect in _one_error_line(err)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_missing_data(run_cli, tmp_path):
    code, _, err = run_cli(*BASE, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "run")
    assert code == 2 and "no such file" in _one_error_line(err)


def test_empty_corpus(run_cli, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run_cli(*BASE, "--data", empty, "--out", tmp_path / "run")
    assert code == 2 and "no non-empty documents" in _one_error_line(err)


def test_malformed_jsonl_names_file_and_line(run_cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    code, _, err = run_cli(*BASE, "--data", bad, "--out", tmp_path / "run")
    assert code == 2 and f"{bad}:2" in _one_error_line(err)


def test_missing_text_field_lists_fields(run_cli, tmp_path):
    bad = tmp_path / "fields.jsonl"
    bad.write_text('{"body": "text here"}\n')
    code, _, err = run_cli(*BASE, "--data", bad, "--out", tmp_path / "run")
    line = _one_error_line(err)
    assert code == 2 and f"{bad}:1" in line and "body" in line


def test_unknown_model_offline(run_cli, corpus, tmp_path):
    code, _, err = run_cli(*BASE, "--data", corpus, "--out", tmp_path / "run", "--model", "nobody/nothing")
    assert code == 2 and "tiny-random" in _one_error_line(err)


def test_out_holding_a_finished_run(run_cli, corpus, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*BASE, "--data", corpus, "--out", out)[0] == 0
    code, _, err = run_cli(*BASE, "--data", corpus, "--out", out)
    assert code == 2 and "finished" in _one_error_line(err)


def test_resume_of_a_non_run(run_cli, tmp_path):
    code, _, err = run_cli("train", "--resume", tmp_path)
    assert code == 2 and "not a run directory" in _one_error_line(err)


def test_bad_config_file(run_cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch: -3\n")
    code, _, err = run_cli("train", "--config", cfg, "--out", tmp_path / "run")
    assert code == 2 and "train.batch" in _one_error_line(err)


def test_adapter_for_another_base(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from adaptlab.artifacts import load_tuned
    from adaptlab.errors import UserError

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=49152,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="does not fit base"):
        load_tuned(tmp_path / "adapter", "tiny-random")
