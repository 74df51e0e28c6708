"""Bad configuration and data values: one line naming the file, field or limit, exit 2, nothing trained.

Covers strict typing of config values, files that are not UTF-8, bounds only the model knows
(rank, sequence length), a validation split too short for one block, and unknown names offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_corpus

from adaptlab.compare.spec import build_spec
from adaptlab.config import build_config, load_config
from adaptlab.errors import UserError

TRAIN = ["train", "--model", "tiny-random", "--batch", "1", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), n_docs=12)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field", "shown"),
    [
        ("train: {steps: true}", "train.steps", "true"),
        ("train: {grad_accum: '4'}", "train.grad_accum", '"4"'),
        ("train: {steps: 2.5}", "train.steps", "2.5"),
        ("method: {rank: yes}", "method.rank", "true"),
        ("method: {rslora: 1}", "method.rslora", "1"),
        ("train: {lr: true}", "train.lr", "true"),
        ("train: {grad_checkpointing: 'no'}", "train.grad_checkpointing", '"no"'),
    ],
)
def test_config_values_are_strictly_typed(run_cli, corpus, tmp_path, text, field, shown) -> None:
    cfg = _yaml(tmp_path, text)
    out = tmp_path / "run"
    code, _, err = run_cli(*TRAIN, "--config", cfg, "--data", corpus, "--seq-len", "16", "--out", out)
    assert code == 2
    line = _one_error_line(err)
    assert f"config field {field}:" in line and f"(got {shown})" in line, line
    assert not (out / "metrics.jsonl").exists()


def test_numbers_still_read_as_numbers(tmp_path) -> None:
    """Strict types must not refuse what YAML users write: ints for floats, 1e-3 (YAML 1.2 float)."""
    path = _yaml(tmp_path, "train: {lr: 1e-3, weight_decay: 0, warmup: .5e-1, max_grad_norm: 2}\n")
    config = build_config(load_config(path))
    assert config.train.lr == pytest.approx(1e-3) and config.train.warmup == pytest.approx(0.05)
    assert config.train.weight_decay == 0.0 and config.train.max_grad_norm == 2.0


def test_compare_values_are_strictly_typed() -> None:
    base = {"model": "tiny-random", "data": {"train": ["x"]}, "study": "methods"}
    with pytest.raises(UserError, match=r"field tokens: Input should be a valid integer \(got true\)"):
        build_spec({**base, "tokens": True})
    with pytest.raises(UserError, match=r"field arms.0.rank: .*\(got \"8\"\)"):
        build_spec({**base, "tokens": 100, "arms": [{"name": "a", "method": "lora", "rank": "8"}]})


def test_non_utf8_config_names_the_file_and_line(run_cli, corpus, tmp_path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"train:\n  steps: 2\n  # caf\xe9\n")
    code, _, err = run_cli(*TRAIN, "--config", cfg, "--data", corpus, "--out", tmp_path / "run")
    assert code == 2
    assert f"{cfg}:3: not UTF-8" in _one_error_line(err)


def test_non_utf8_compare_config_names_the_file(run_cli, tmp_path) -> None:
    cfg = tmp_path / "compare.yaml"
    cfg.write_bytes(b"model: tiny-random\ntokens: 10\n\xff\xfe\n")
    code, _, err = run_cli("compare", "--config", cfg, "--out", tmp_path / "out")
    assert code == 2
    assert f"{cfg}:3: not UTF-8" in _one_error_line(err)


def test_non_utf8_jsonl_names_the_file_and_line(run_cli, tmp_path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    code, _, err = run_cli(*TRAIN, "--steps", "1", "--data", data, "--out", tmp_path / "run")
    assert code == 2
    assert f"{data}:2: not UTF-8" in _one_error_line(err)


def test_rank_above_the_smallest_targeted_dimension_is_refused(run_cli, corpus, tmp_path) -> None:
    # tiny-random: hidden 64, so every attention and MLP Linear has a dimension of 64 or less
    args = [*TRAIN, "--steps", "1", "--seq-len", "16", "--data", corpus, "--out", tmp_path / "run"]
    code, _, err = run_cli(*args, "--rank", "100000")
    assert code == 2
    line = _one_error_line(err)
    assert "--rank 100000 exceeds" in line and "use a rank of" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rank_limit_is_the_targeted_modules_own(tiny) -> None:
    from adaptlab.methods import check_against_model

    small = min(min(m.in_features, m.out_features) for m in _linears(tiny.model))
    ok = build_config({"method": {"rank": small}, "model": {"name": "tiny-random"}})
    check_against_model(ok, tiny.model)
    with pytest.raises(UserError, match=f"--rank {small + 1} exceeds {small},"):
        check_against_model(build_config({"method": {"rank": small + 1}}), tiny.model)
    full = build_config({"method": {"method": "full", "rank": 10_000}})
    check_against_model(full, tiny.model)  # full fine-tuning has no rank


def _linears(model) -> list:
    from adaptlab.methods import linear_modules

    return list(linear_modules(model).values())


def test_seq_len_beyond_the_models_positions_is_refused(run_cli, corpus, tiny, tmp_path) -> None:
    limit = tiny.model.config.max_position_embeddings
    args = [*TRAIN, "--steps", "1", "--data", corpus, "--out", tmp_path / "run"]
    code, _, err = run_cli(*args, "--seq-len", str(limit + 1))
    assert code == 2
    line = _one_error_line(err)
    assert f"--seq-len {limit + 1} exceeds the {limit:,} positions" in line, line
    code, _, err = run_cli("eval", "--model", "tiny-random", "--data", corpus, "--seq-len", str(limit + 1))
    assert code == 2 and f"--seq-len {limit + 1} exceeds" in _one_error_line(err)


def test_plan_refuses_seq_len_and_ranks_beyond_the_model(run_cli, corpus, tiny) -> None:
    limit = tiny.model.config.max_position_embeddings
    base = ["plan", "--model", "tiny-random", "--data", corpus, "--no-benchmark"]
    code, _, err = run_cli(*base, "--seq-len", str(limit * 2))
    assert code == 2 and f"exceeds the {limit:,} positions" in _one_error_line(err)
    code, _, err = run_cli(*base, "--ranks", "8,4096")
    assert code == 2 and "--ranks 4096 exceeds" in _one_error_line(err)


def test_compare_refuses_an_arm_rank_beyond_the_model(tmp_path) -> None:
    from adaptlab.compare.arms import resolve_ranks

    spec = build_spec(
        {
            "model": "tiny-random",
            "data": {"train": ["x"]},
            "tokens": 100,
            "arms": [{"name": "big", "method": "lora", "rank": 5000}],
        }
    )
    with pytest.raises(UserError, match="arm big: rank 5000 exceeds"):
        resolve_ranks(spec)


def test_short_validation_split_is_named_as_the_cause(run_cli, tmp_path) -> None:
    """Plenty of training text, but the held-out documents are too short for one block."""
    data = tmp_path / "data.jsonl"
    with data.open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"id": f"d{i}", "text": "word " * (400 if i % 2 else 5)}) + "\n")
    args = [*TRAIN, "--steps", "1", "--data", data, "--out", tmp_path / "run", "--seq-len", "1024"]
    from adaptlab.data.corpus import split_documents
    from adaptlab.data.sources import load_documents

    val = split_documents(load_documents(str(data)), "val")
    assert sum(len(d.text) for d in val) < 1024  # the premise: validation text is short
    code, _, err = run_cli(*args)
    assert code == 2
    line = _one_error_line(err)
    assert "validation split" in line and "val_frac" in line, line
    assert "yields no training example" not in line


# A process without the offline flags the test session sets and without DNS (what a user without a
# connection has). A name that cannot be found must fail before torch is imported (which alone takes
# seconds), so the command answers at once instead of after the imports and the hub client's retries.
_OFFLINE_RUN = """
import socket, sys
def no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = no_dns
from adaptlab.cli import main
code = main(sys.argv[1:])
print("torch imported" if "torch" in sys.modules else "torch not imported")
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["plan", "--model", "not-a-model", "--data", "python-stdlib", "--no-benchmark"], "not-a-model"),
        (["train", "--model", "tiny-random", "--data", "mydata", "--steps", "1", "--quiet"], "mydata"),
        (["train", "--model", "not-a-model", "--data", "python-stdlib", "--steps", "1"], "not-a-model"),
        (["eval", "--model", "not-a-model", "--data", "python-stdlib"], "not-a-model"),
    ],
)
def test_unknown_names_offline_fail_fast_in_one_line(tmp_path, args, words) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", _OFFLINE_RUN, *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert words in _one_error_line(proc.stderr)
    assert proc.stdout.strip() == "torch not imported"
    assert not (tmp_path / "out").exists()


def test_an_unpaired_surrogate_in_a_document_names_file_and_line(run_cli, corpus, tmp_path) -> None:
    data = tmp_path / "docs.jsonl"
    lines = corpus.read_text().splitlines()
    data.write_text("\n".join([*lines[:3], json.dumps({"text": "ok " * 40 + "\udcbe"}), *lines[3:]]) + "\n")
    code, _, err = run_cli(*TRAIN, "--data", data, "--steps", "1", "--seq-len", "16", "--out", tmp_path / "r")
    assert code == 2
    assert f"{data}:4" in _one_error_line(err) and "surrogate" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("false\n", "mapping at the top level"), ('model: {name: "tiny\\udcbe"}\n', "model.name")],
)
def test_a_config_that_is_not_a_mapping_of_text_is_refused(tmp_path, text, expected) -> None:
    with pytest.raises(UserError, match=expected):
        load_config(_yaml(tmp_path, text))


def test_an_empty_config_file_is_an_empty_mapping(tmp_path) -> None:
    assert load_config(_yaml(tmp_path, "")) == {}


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--group-size", "4"], "--group-size"),
        (["--kl-beta", "0.1"], "--kl-beta"),
        (["--beta", "0.2"], "--beta"),
        (["--dpo-loss", "ipo"], "--dpo-loss"),
        (["--method", "full", "--rank", "8"], "--rank"),
        (["--method", "full", "--targets", "attention"], "--targets"),
    ],
)
def test_a_flag_the_run_would_not_use_is_one_line_exit_2(run_cli, tmp_path, args, flag):
    """A task's or the LoRA family's flag on a run of another task or method is refused, not ignored."""
    code, _, err = run_cli(
        "train", "--model", "tiny-random", "--data", "python-stdlib", *args, "--out", tmp_path / "r"
    )
    assert code == 2 and f"{flag} applies to" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_non_finite_number_is_refused_before_training(run_cli, corpus, tmp_path, value) -> None:
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--lr", value, "--out", tmp_path / "r")
    assert code == 2 and "train.lr" in _one_error_line(err) and not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="finite"):
        arm = {"name": "a", "method": "lora", "lr": float(value)}
        build_spec(
            {"model": "tiny-random", "data": {"train": ["python-stdlib"]}, "tokens": 100, "arms": [arm]}
        )


def test_plan_refuses_a_compare_root_that_is_not_there(run_cli, corpus, tmp_path) -> None:
    args = ["plan", "--model", "tiny-random", "--data", corpus, "--no-benchmark"]
    code, _, err = run_cli(*args, "--compare-root", tmp_path / "nope")
    assert code == 2 and "--compare-root" in _one_error_line(err)


@pytest.mark.parametrize("epochs", ["nan", "inf", "0"])
def test_plan_refuses_epochs_that_are_not_a_positive_number(run_cli, corpus, epochs) -> None:
    code, _, err = run_cli(
        "plan", "--model", "tiny-random", "--data", corpus, "--epochs", epochs, "--no-benchmark"
    )
    assert code == 2 and "--epochs" in _one_error_line(err)


@pytest.mark.parametrize("gpus", ["0", "-3"])
def test_plan_refuses_fewer_than_one_gpu(run_cli, corpus, gpus) -> None:
    code, _, err = run_cli(
        "plan", "--model", "tiny-random", "--data", corpus, "--gpus", gpus, "--no-benchmark"
    )
    assert code == 2 and "--gpus" in _one_error_line(err)


def test_a_key_given_twice_names_the_file_and_line(run_cli, corpus, tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: tiny-random}\ntrain:\n  steps: 2\n  steps: 3\n")
    code, _, err = run_cli("train", "--config", config, "--data", corpus, "--out", tmp_path / "r")
    assert code == 2 and f"{config}:4: key 'steps' given twice" in _one_error_line(err)
    merged = tmp_path / "m.yaml"  # a YAML merge key may still be overridden by the mapping's own keys
    merged.write_text("base: &b {steps: 2}\ntrain:\n  <<: *b\n  steps: 3\n")
    assert load_config(merged)["train"] == {"steps": 3}


def test_a_non_utf8_text_file_names_its_line(run_cli, tmp_path) -> None:
    data = tmp_path / "notes.txt"
    data.write_bytes(b"first line\nsecond \xff line\n")
    code, _, err = run_cli("eval", "--model", "tiny-random", "--data", data)
    assert code == 2 and f"{data}:2: not UTF-8" in _one_error_line(err)


def test_instruction_data_whose_prompts_fill_the_window_says_so(run_cli, tmp_path, caplog) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"word {i} " * 60, "response": "ok"}) + "\n" for i in range(20))
    )
    code, _, err = run_cli(*TRAIN, "--steps", "1", "--seq-len", "64", "--data", data, "--out", tmp_path / "r")
    assert code == 0 and "no training example keeps a token to learn" in caplog.text, err


@pytest.mark.parametrize("seed", ["-1", "99999999999", "4294967296"])
def test_a_seed_outside_what_the_seeding_accepts_is_refused_before_writing(run_cli, corpus, tmp_path, seed):
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--seed", seed, "--out", tmp_path / "r")
    assert code == 2 and "train.seed" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_trains_sft_and_grpo(run_cli, corpus, tmp_path) -> None:
    """2**32 - 1 seeds numpy, the data order, and GRPO's per-row sampling generators."""
    steps = ["--steps", "1", "--seed", str(2**32 - 1)]
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--seq-len", "16", *steps, "--out", tmp_path / "s")
    assert code == 0, err
    grpo = ["--task", "grpo", "--data", "arithmetic", "--group-size", "2", "--max-new-tokens", "4"]
    code, _, err = run_cli(*TRAIN, *grpo, *steps, "--out", tmp_path / "g")
    assert code == 0, err


@pytest.mark.parametrize("nproc", ["0", "-2"])
def test_fewer_than_one_process_is_one_line_exit_2(run_cli, corpus, tmp_path, nproc) -> None:
    code, _, err = run_cli(*TRAIN, "--data", corpus, "--nproc", nproc, "--out", tmp_path / "r")
    assert code == 2 and "--nproc" in _one_error_line(err)
    assert not (tmp_path / "r").exists()
