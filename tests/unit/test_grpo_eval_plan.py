"""Task accuracy in `adaptlab eval`, GRPO in `adaptlab plan`, and the RL studies' arms (tiny-random)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adaptlab.compare.rl import LORA_RL_ALPHA, RLStudy, run_config, sft_answers_file
from adaptlab.config import build_config
from adaptlab.data.tasks import load_task, split_items
from adaptlab.evaluate.task import TaskScores, task_section
from adaptlab.plan.arch import load_arch
from adaptlab.plan.estimate import generation_memory_bytes


def test_eval_task_reports_pass1_and_mean_reward(run_cli, tmp_path: Path) -> None:
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(6)))
    code, out, err = run_cli(
        "eval", "--model", "tiny-random", "--task", task, "--task-k", "2", "--json", "--no-cache"
    )
    assert code == 0, err
    t = json.loads(out)["task"]
    assert t["name"] == str(task) and t["reward"] == "exact" and t["k"] == 2
    assert t["n"] == len(split_items(load_task(str(task)), "test"))
    assert 0.0 <= t["pass1"] <= 1.0 and 0.0 <= t["mean_reward_k"] <= 1.0


def test_eval_task_bad_reward_is_one_line(run_cli) -> None:
    code, _, err = run_cli("eval", "--model", "tiny-random", "--task", "arithmetic", "--task-reward", "fuzzy")
    assert code == 2 and "unknown reward 'fuzzy'" in err and len(err.strip().splitlines()) == 1


def test_task_section_pairs_tuned_with_base() -> None:
    tuned = TaskScores(np.array([1.0, 1.0, 0.0, 1.0]), np.array([0.5, 1.0, 0.0, 0.75]), 4)
    base = TaskScores(np.array([0.0, 1.0, 0.0, 0.0]), np.array([0.25, 0.5, 0.0, 0.0]), 4)
    s = task_section(tuned, base)
    assert s["pass1"] == 0.75 and s["base"]["pass1"] == 0.25
    assert s["delta"]["pass1"] == 0.5 and s["delta"]["pass1_ci95"][0] <= 0.5 <= s["delta"]["pass1_ci95"][1]
    assert s["delta"]["mean_reward_k"] == pytest.approx(0.375)


def test_generation_memory_is_the_kv_cache_of_every_row() -> None:
    arch = load_arch("tiny-random")
    kv = 2 * arch.n_layers * arch.kv_dim * 4 * 32 * 100  # K and V per layer, fp32, 32 rows of 100 tokens
    assert generation_memory_bytes(arch, 32, 100, "fp32") == kv + 4 * arch.vocab * 32 * 2
    assert generation_memory_bytes(arch, 32, 100, "bf16") == kv // 2 + 4 * arch.vocab * 32 * 2


def test_plan_grpo_adds_sampling_memory_and_time() -> None:
    """Sampling decodes every completion of a step's prompts together: batch x grad_accum prompts, group
    size rows each, as the GRPO objective samples them."""
    from adaptlab.models import load_tokenizer
    from adaptlab.plan import plan
    from adaptlab.plan.grpo import Sampling, task_data_size

    kwargs = {"task": "grpo", "benchmark": False, "precision": "fp32", "device": "cpu"}
    grpo = plan("tiny-random", ["arithmetic"], batch=4, grad_accum=2, **kwargs)
    lora = grpo["methods"]["lora"]
    assert grpo["task"] == "grpo" and grpo["data"]["kind"] == "task"
    _, prompt_len = task_data_size("arithmetic", load_tokenizer("tiny-random"), Sampling())
    arch = load_arch("tiny-random")
    rows = 4 * 2 * 8
    assert lora["memory"]["generation"] == generation_memory_bytes(arch, rows, prompt_len + 32, "fp32")
    assert lora["time_breakdown_s"]["generation_s"] > 0
    assert lora["peak_mem_bytes"] >= lora["memory"]["weights"] + lora["memory"]["generation"]
    assert grpo["setup"]["steps_per_epoch"] == -(-grpo["data"]["train_documents"] // 8)
    assert grpo["setup"]["sampling"] == {"group_size": 8, "max_new_tokens": 32, "prompt_len": prompt_len}
    assert "--study rl" in grpo["recommendation"]["command"]  # GRPO arms are compared by the rl study
    wider = plan("tiny-random", ["arithmetic"], batch=4, grad_accum=2, group_size=16, **kwargs)["methods"]
    assert wider["lora"]["memory"]["generation"] == generation_memory_bytes(
        arch, 2 * rows, prompt_len + 32, "fp32"
    )
    longer = plan("tiny-random", ["arithmetic"], batch=4, grad_accum=2, max_new_tokens=64, **kwargs)[
        "methods"
    ]
    gen_s = lora["time_breakdown_s"]["generation_s"]
    assert longer["lora"]["time_breakdown_s"]["generation_s"] > 1.5 * gen_s
    notes = plan("tiny-random", ["arithmetic"], group_size=16, **kwargs)["notes"]
    assert any("16 completions" in n for n in notes)


def test_rl_study_arms_share_everything_but_method_and_lr(tmp_path: Path) -> None:
    study = RLStudy(model="tiny-random", steps=2)
    arms = study.arms()
    assert [a.name for a in arms] == ["lora-r1", "lora-r4", "lora-r16", "full"]
    configs = [build_config(run_config(study, a, tmp_path / a.name, None)) for a in arms]
    assert {c.objective.task for c in configs} == {"grpo"}
    assert len({(c.train.steps, c.objective.prompts_per_step, c.objective.group_size) for c in configs}) == 1
    assert [c.method.alpha for c in configs[:3]] == [LORA_RL_ALPHA] * 3
    assert configs[0].train.lr == pytest.approx(10 * configs[-1].train.lr)
    sft = RLStudy(study="sft-vs-rl", model="tiny-random").arms()
    assert {a.task for a in sft} == {"sft", "grpo"}
    data = sft_answers_file("arithmetic", tmp_path)
    first = json.loads(data.read_text().splitlines()[0])
    assert set(first) == {"id", "prompt", "response"} and first["response"].isdigit()
    cfg = build_config(run_config(study, sft[1], tmp_path / "sft", data))
    assert cfg.objective.task == "sft" and cfg.train.batch == study.prompts_per_step


def tiny_rl_study(kind: str, steps: int) -> RLStudy:
    """An RL study of tiny-random at the smallest size that exercises every step: LoRA r1 and full."""
    return RLStudy(
        study=kind,
        model="tiny-random",
        steps=steps,
        prompts_per_step=2,
        group_size=2,
        max_new_tokens=4,
        eval_prompts=4,
        drift_tokens=4,
        ranks=(1,),
        seeds=1,
    )


@pytest.mark.parametrize("kind", ["rl", "sft-vs-rl"])
def test_rl_studies_run_end_to_end(tmp_path, kind) -> None:
    """Every arm trains and is scored next to the base; results.json and report.md are written."""
    from adaptlab.compare.rl import run_study

    study = tiny_rl_study(kind, steps=1)
    results = run_study(study, tmp_path / "study", on_event=lambda msg: None)
    assert [r["arm"] for r in results["arms"]] == [a.name for a in study.arms()]
    for row in results["arms"]:
        assert 0.0 <= row["pass1"] <= 1.0 and row["drift_kl"] >= 0.0
        lo, hi = row["delta_pass1_ci95"]
        assert lo <= row["delta_pass1"] <= hi
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["arms"] == results["arms"] and (tmp_path / "study" / "report.md").read_text()
    if kind == "rl":
        assert set(results["rank1_vs_full"]) >= {"delta_pass1", "ci95", "matched"}


def test_compare_rl_takes_its_task_from_data(run_cli, tmp_path: Path, monkeypatch) -> None:
    """--data is the RL study's task; what a methods study would take and an RL study would not use is
    refused in one line, exit 2."""
    import adaptlab.compare.rl as rl

    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(6)))
    seen: list[RLStudy] = []

    def fake_run_study(study: RLStudy, out: str, on_event: object = None) -> dict:
        seen.append(study)
        Path(out, "report.md").write_text("report\n")
        return {}

    monkeypatch.setattr(rl, "run_study", fake_run_study)
    code, out, err = run_cli(
        "compare", "--study", "rl", "--model", "tiny-random", "--data", task, "--out", tmp_path / "s"
    )
    assert code == 0, err
    assert seen[0].task == str(task) and seen[0].model == "tiny-random"
    for args, match in (
        (["--data", task, "--tokens", "100"], "--tokens"),
        (["--data", task, "--general", "python-stdlib"], "--general"),
        (["--data", task, "--data", "arithmetic"], "one --data"),
    ):
        code, _, err = run_cli(
            "compare", "--study", "rl", "--model", "tiny-random", *args, "--out", tmp_path / "x"
        )
        assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_a_killed_rl_study_reuses_finished_arms_and_resumes_the_rest(tmp_path, monkeypatch) -> None:
    """Run again, a study trains nothing it finished with the same config; an arm without its summary
    (killed before the end) resumes; the results are the same."""
    import adaptlab.train as train_module
    from adaptlab.compare.rl import run_study

    study = tiny_rl_study("rl", steps=2)
    first = run_study(study, tmp_path / "s", on_event=lambda msg: None)
    trained: list[str] = []
    real_train = train_module.train

    def recording_train(config, *args, **kwargs):  # resume_run trains through it too
        trained.append(f"{Path(config.out).name}{' (resumed)' if kwargs.get('resume') else ''}")
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", recording_train)
    (tmp_path / "s" / "runs" / "full" / "summary.json").unlink()  # as if killed before the end
    again = run_study(study, tmp_path / "s", on_event=lambda msg: None)
    assert trained == ["full (resumed)"]
    assert [r["pass1"] for r in again["arms"]] == [r["pass1"] for r in first["arms"]]
    assert again["rank1_vs_full"] == first["rank1_vs_full"]
