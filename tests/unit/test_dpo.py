"""DPO on tiny-random: every method trains against its reference, resume is bit-exact, bad rows are one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file, save_file

from adaptlab.config import ObjectiveSpec
from adaptlab.data.preference import _record, collate_pairs, tokenize_pair
from adaptlab.objectives.dpo import REFERENCE_FILE, sequence_logps
from adaptlab.rundir import RunDir
from adaptlab.train import prepare, resume_run, train

SEQ_LEN = 80  # the SmolLM2 chat template's system turn makes these prompts ~45 tokens


@pytest.fixture(scope="module")
def pairs(shared_data, tmp_path_factory):
    """40 rows of the shipped WordNet preference pairs."""
    lines = (shared_data / "preference" / "wordnet_define_pairs.jsonl").read_text().splitlines()[:40]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def dpo_config(data, out, method="lora", loss="sigmoid", **train_fields):
    cfg = tiny_config(data, out, method=method, seq_len=SEQ_LEN, **train_fields)
    cfg.objective = ObjectiveSpec(task="dpo", beta=0.1, loss=loss)
    return cfg


def _rows(run, key="loss"):
    return [r for r in RunDir(run).read_metrics() if key in r]


@pytest.mark.parametrize(
    ("method", "extra"),
    [("full", {}), ("lora", {}), ("lora", {"rslora": True}), ("dora", {}), ("qlora", {})],
    ids=["full", "lora", "rslora", "dora", "qlora"],
)
def test_every_method_starts_at_its_reference_and_moves_away(pairs, tmp_path, method, extra):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    summary = train(dpo_config(pairs, tmp_path / "run", method=method, steps=2, lr=1e-2, **extra))
    first, last = _rows(tmp_path / "run")
    # step 1 runs on the untouched weights: the policy is its reference, so every reward is 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["rewards/chosen"] != 0.0 and math.isfinite(last["loss"])
    assert summary["task"] == "dpo" and 0.0 <= summary["final_val"]["val_rewards/accuracies"] <= 1.0
    assert (tmp_path / "run" / REFERENCE_FILE).exists() == (method == "full")


def test_lora_at_bf16_with_its_base_held_in_bf16_takes_the_fp32_bases_steps(pairs, tmp_path, monkeypatch):
    """The reference pass (adapter disabled: PEFT's forward over the held bf16 base) and the policy's
    log-probs are the ones an fp32 base gives under bf16 autocast (adaptlab.frozen_base)."""
    import adaptlab.train.build as train_build

    train(dpo_config(pairs, tmp_path / "held", steps=2, lr=1e-2, precision="bf16"))
    monkeypatch.setattr(train_build, "hold_frozen_linears", lambda model: 0)
    train(dpo_config(pairs, tmp_path / "fp32", steps=2, lr=1e-2, precision="bf16"))
    held, fp32 = _rows(tmp_path / "held"), _rows(tmp_path / "fp32")
    drop = ("tokens_per_s", "mem_bytes", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in held] == [
        {k: v for k, v in r.items() if k not in drop} for r in fp32
    ]
    assert held[-1]["rewards/chosen"] != 0.0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_equals_uninterrupted(pairs, tmp_path, method):
    extra = {"dropout": 0.1} if method == "lora" else {}
    whole = train(
        dpo_config(pairs, tmp_path / "whole", method=method, loss="ipo", steps=4, save_every=2, **extra)
    )

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(
            dpo_config(pairs, cut, method=method, loss="ipo", steps=4, save_every=2, **extra),
            on_log=stop_at_3,
        )
    assert RunDir(cut).latest_checkpoint().name == "step-2"
    resumed = resume_run(cut)
    assert _without_timing(cut) == _without_timing(tmp_path / "whole")  # losses and rewards, bit-for-bit
    assert resumed["final_val"] == whole["final_val"]


def _without_timing(run):
    timing = ("tokens_per_s", "mem_bytes", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in RunDir(run).read_metrics()]


def test_full_reference_is_computed_once_from_the_base_then_read_back(pairs, tmp_path):
    from adaptlab.objectives.dpo import load_or_compute_reference

    setup = prepare(dpo_config(pairs, tmp_path / "run", method="full", steps=2))
    setup.run.root.mkdir(parents=True, exist_ok=True)
    computed = load_or_compute_reference(setup)
    batch = collate_pairs(setup.train_examples[:2], setup.tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = sequence_logps(setup.model, batch).chunk(2)
    assert torch.allclose(computed["train"][:2], torch.stack([chosen, rejected], dim=1), atol=1e-4, rtol=0)
    # a resume reads the stored reference (whatever the weights are by then), it does not recompute it
    stored = load_file(str(setup.run.root / REFERENCE_FILE))
    save_file({k: v + 1.0 for k, v in stored.items()}, str(setup.run.root / REFERENCE_FILE))
    assert torch.equal(load_or_compute_reference(setup)["train"], stored["train"] + 1.0)
    # a damaged file (a copy cut short) is computed again from the untouched model, not a traceback
    path = setup.run.root / REFERENCE_FILE
    path.write_bytes(path.read_bytes()[:100])
    assert torch.allclose(load_or_compute_reference(setup)["train"], computed["train"], atol=1e-6, rtol=0)


def test_conversational_rows_tokenize_as_string_rows(tiny):
    plain = {"prompt": 'Define "cat".', "chosen": "a small feline", "rejected": "a large river"}
    chat = {
        "prompt": [{"role": "user", "content": plain["prompt"]}],
        "chosen": [{"role": "assistant", "content": plain["chosen"]}],
        "rejected": {"role": "assistant", "content": plain["rejected"]},
    }
    a = tokenize_pair(_record(plain, "a:1", "a"), tiny.tokenizer, 256)
    b = tokenize_pair(_record(chat, "b:1", "b"), tiny.tokenizer, 256)
    assert a == b
    n_prompt = a.chosen.labels.count(-100)
    assert a.chosen.input_ids[:n_prompt] == a.rejected.input_ids[:n_prompt]
    assert tiny.tokenizer.decode(a.chosen.input_ids[n_prompt:]).startswith("a small feline")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "c"}, "no field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "`chosen` must be a string or one assistant message"),
        ({"prompt": [{"role": "user"}], "chosen": "c", "rejected": "r"}, "`prompt` must be a string or"),
        (
            {"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
            "one assistant message",
        ),
        (
            {"prompt": "word " * 200, "chosen": "c", "rejected": "r"},
            "leaves no room for a response within --seq-len",
        ),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "are the same response"),
        (
            {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "c"},
            "are the same response",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "r"}, "`chosen` is empty"),
        (
            {"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": " "}]},
            "`rejected` is empty",
        ),
        (
            {"prompt": [{"role": "wizard", "content": "p"}], "chosen": "c", "rejected": "r"},
            "unknown role 'wizard' in `prompt`",
        ),
    ],
    ids=[
        "missing",
        "ill-typed",
        "bad-prompt",
        "not-assistant",
        "prompt-too-long",
        "same",
        "same-chat",
        "empty-chosen",
        "empty-rejected",
        "unknown-role",
    ],
)
def test_bad_rows_are_one_line_naming_file_and_line(tmp_path, run_cli, row, message):
    good = {"prompt": 'Define "cat".', "chosen": "a small feline", "rejected": "a large river"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, row] + [good] * 5))
    config = tmp_path / "run.yaml"  # nothing held out: every row trains, so every row is tokenized
    config.write_text("data: {val_frac: 0.0, test_frac: 0.0}\n")
    code, _, err = run_cli(
        "train", "--config", config, "--task", "dpo", "--model", "tiny-random", "--data", data, "--steps", "1",
        "--seq-len", str(SEQ_LEN), "--batch", "8", "--out", tmp_path / "run", "--quiet",
    )  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"{data}:3" in lines[0] and message in lines[0]


def test_plan_dpo_has_the_reference_pass_and_no_second_model(pairs, tmp_path):
    from adaptlab.plan.planner import plan

    result = plan("tiny-random", [str(pairs)], task="dpo", seq_len=SEQ_LEN, batch=2, benchmark=False)
    full, lora = result["methods"]["full"], result["methods"]["lora"]
    assert full["memory"]["weights"] == 4 * result["architecture"]["total_params"]  # no frozen copy
    assert full["reference"].startswith("precomputed") and lora["reference"].startswith("adapter-disabled")
    for entry, share in ((full, 2 / 6), (lora, 2 / 4)):  # a forward pass against the step's backward
        t = entry["time_breakdown_s"]
        assert t["attention_s"] > 0  # attention's forward is a third of its training FLOPs
        assert t["reference_s"] == pytest.approx(t["matmul_s"] * share + t["attention_s"] / 3)
        assert entry["step_s"] == pytest.approx(sum(t.values()))
    # conversational rows plan as their string form does
    chat = tmp_path / "chat.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
            )
            + "\n"
            for r in rows
        )
    )
    again = plan("tiny-random", [str(chat)], task="dpo", seq_len=SEQ_LEN, batch=2, benchmark=False)
    assert again["data"]["tokens_per_epoch"] > 0
    assert again["data"]["documents"] == result["data"]["documents"] == len(rows)


def test_plan_dpo_suggests_dpo_runs_that_train(pairs, tmp_path, run_cli):
    """compare has no DPO study: plan suggests one `train --task dpo` per method, and they run."""
    import shlex

    from adaptlab.plan.planner import plan

    rec = plan("tiny-random", [str(pairs)], task="dpo", seq_len=SEQ_LEN, batch=2, benchmark=False)[
        "recommendation"
    ]
    lines = rec["command"].splitlines()
    assert [line.split(" --method ")[1].split()[0] for line in lines[:2]] == ["lora", "full"]
    assert all(line.startswith("adaptlab train --task dpo --model tiny-random --data ") for line in lines[:2])
    assert lines[2:] == [f"adaptlab eval --tuned {shlex.split(line)[-1]} --drift" for line in lines[:2]]
    assert "compare" not in rec["command"] and "DPO runs below" in rec["reasons"][-1]
    args = shlex.split(lines[0])[1:]
    args[args.index("--out") + 1] = str(tmp_path / "run")
    code, _, err = run_cli(*args, "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["task"] == "dpo"
