"""GRPO on tiny-random: advantages and loss against TRL on identical inputs, sampling log-probs, runs, resume."""

from __future__ import annotations

import copy
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adaptlab.config import build_config
from adaptlab.models import load_model
from adaptlab.objectives.grpo import (
    completion_logps,
    group_advantages,
    per_token_loss,
    rollout_batch,
    row_generators,
    sequence_means,
)
from adaptlab.rundir import RunDir
from adaptlab.sampling import sample
from adaptlab.train import resume_run, train

trl_utils = pytest.importorskip("trl.trainer.utils")
TOL = 1e-6
"""fp32: our loss and TRL's on the same log-probs agree to rounding."""


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random")


def test_group_advantages_equal_trls_group_scaling() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 1.0])
    adv, std = group_advantages(rewards, 4)
    # TRL's _generate_and_score_completions with scale_rewards="group"
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    trl_std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(4)
    expected = (rewards - mean) / (trl_std + 1e-4)
    torch.testing.assert_close(adv, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(std, trl_std, atol=TOL, rtol=0)
    assert adv[4:8].abs().max() == 0  # a group that agrees carries no signal
    assert abs(float(adv[:4].sum())) < 1e-6


def _trl_loss(logps, old, ref, adv, mask, beta, eps):
    """TRL's GRPOTrainer._compute_loss (loss_type="grpo") on the given per-token log-probs."""
    from trl import GRPOTrainer

    stub = object.__new__(GRPOTrainer)
    accel = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1)
    stub.__dict__.update(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type="grpo",
        epsilon_low=eps,
        epsilon_high=eps,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=accel,
    )
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    c = logps.size(1)
    inputs = {
        "prompt_ids": torch.zeros((logps.size(0), 1), dtype=torch.long),
        "prompt_mask": torch.ones((logps.size(0), 1), dtype=torch.long),
        "completion_ids": torch.zeros((logps.size(0), c), dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    return stub._compute_loss(None, inputs), stub._metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trls_grpo_loss_on_identical_inputs(beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    b, c, eps = 6, 5, 0.2
    old = -torch.rand((b, c), generator=g) * 3
    logps = (old + torch.randn((b, c), generator=g) * 0.3).requires_grad_()  # some ratios leave [0.8, 1.2]
    ref = old + torch.randn((b, c), generator=g) * 0.1
    adv = torch.randn(b, generator=g)
    mask = torch.ones((b, c))
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    tok, kl, clipped = per_token_loss(logps, old, adv, eps, beta, ref)
    ours = sequence_means(tok, mask).sum() / b  # the loop divides by the completions of the global batch
    theirs, metrics = _trl_loss(logps, old, ref, adv, mask, beta, eps)
    assert abs(float(ours) - float(theirs)) < TOL
    g_ours = torch.autograd.grad(ours, logps, retain_graph=True)[0]
    g_theirs = torch.autograd.grad(theirs, logps)[0]
    torch.testing.assert_close(g_ours, g_theirs, atol=TOL, rtol=0)
    region = float((clipped * mask).sum() / mask.sum())
    assert region > 0 and abs(region - metrics["clip_ratio/region_mean"][0]) < TOL
    if beta:
        assert abs(float((kl * mask).sum() / mask.sum()) - metrics["kl"][0]) < TOL


def test_clipped_tokens_get_no_gradient() -> None:
    old = torch.zeros((1, 2))
    logps = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 > 1.2, then 1
    tok, _, clipped = per_token_loss(logps, old, torch.tensor([1.0]), 0.2)
    tok.sum().backward()
    assert clipped.tolist() == [[1.0, 0.0]]
    assert logps.grad.tolist()[0][0] == 0.0 and logps.grad.tolist()[0][1] == pytest.approx(-1.0)


def test_training_log_probs_equal_the_sampling_time_log_probs(tiny) -> None:
    """Prompts of different lengths, left-padded while sampling and in the loss: the same log-probs."""
    prompts = [(1, 2, 3, 4, 5), (7, 8)]
    s = sample(
        tiny.model,
        prompts,
        n=3,
        max_new_tokens=6,
        temperature=0.7,
        eos_ids={2},
        pad_id=2,
        generator=torch.Generator().manual_seed(3),
    )
    fake = [SimpleNamespace(ids=p) for p in prompts]
    batch = rollout_batch(fake, s, pad=2)
    with torch.no_grad():
        logps = completion_logps(tiny.model, batch, temperature=0.7)
    mask = batch["completion_mask"]
    torch.testing.assert_close(logps * mask, batch["old_logps"], atol=2e-5, rtol=0)
    again = sample(
        tiny.model,
        prompts,
        n=3,
        max_new_tokens=6,
        temperature=0.7,
        eos_ids={2},
        pad_id=2,
        generator=torch.Generator().manual_seed(3),
    )
    assert again.completions == s.completions  # the generator alone decides


def test_a_rows_samples_do_not_depend_on_the_other_rows_of_its_batch(tiny) -> None:
    """Per-row generators: the global batch sampled at once, or in two halves as two ranks would, gives
    the same completions (GRPO on N processes samples what one process does)."""
    prompts = [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12), (13, 14, 15, 16)]

    def draw(part: list[int]) -> list[list[int]]:
        s = sample(
            tiny.model,
            [prompts[i] for i in part],
            n=3,
            max_new_tokens=6,
            temperature=1.0,
            eos_ids={2},
            pad_id=2,
            generator=row_generators(seed=0, step=5, positions=part, group_size=3),
        )
        return s.completions

    whole = draw([0, 1, 2, 3])
    assert draw([0, 1]) + draw([2, 3]) == whole
    assert len({tuple(c) for c in whole}) > 1  # rows are not all the same draw
    other_step = row_generators(seed=0, step=6, positions=[0], group_size=1)[0]
    assert (
        other_step.initial_seed()
        != row_generators(seed=0, step=5, positions=[0], group_size=1)[0].initial_seed()
    )


def test_draws_follow_the_probabilities_and_never_pick_a_zero() -> None:
    """Inverse-CDF draws: frequencies within 4 standard errors of the probabilities (unnormalised rows
    and zeros, as top-p leaves them); a row's draws with its own generator match it drawn alone."""
    from adaptlab.sampling import draw

    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 1e-3, 0.299, 0.0])
    rows = 40_000
    tokens = draw((3 * p).expand(rows, -1), torch.Generator().manual_seed(0), range(rows))
    freq = torch.bincount(tokens, minlength=p.numel()).double() / rows
    assert freq[p == 0].sum() == 0
    se = (p.double() * (1 - p.double()) / rows).sqrt()
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), freq
    probs = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(1)), -1)
    gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
    together = draw(probs, gens, [0, 1, 2])
    gens = [torch.Generator().manual_seed(10 + r) for r in range(3)]
    alone = [int(draw(probs[r : r + 1], gens, [r])[0]) for r in range(3)]
    assert together.tolist() == alone


def test_a_frozen_head_cast_once_a_rollout_samples_what_autocast_would(tiny, monkeypatch) -> None:
    """Under bf16 autocast a frozen tied fp32 head is cast once for the rollout: the same completions
    and log-probs as casting it at every token, and the tied parameter is back afterwards."""
    from adaptlab import sampling

    model = copy.deepcopy(tiny.model).requires_grad_(False)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb

    def rollout() -> sampling.Samples:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sample(
                model,
                [(1, 2, 3), (4, 5)],
                n=2,
                max_new_tokens=5,
                temperature=1.0,
                eos_ids={2},
                pad_id=2,
                generator=torch.Generator().manual_seed(4),
            )

    casts = []
    original = sampling._cast_head_once
    monkeypatch.setattr(sampling, "_cast_head_once", lambda m: casts.append(1) or original(m))
    once = rollout()
    assert casts and model.get_output_embeddings().weight is emb
    monkeypatch.setattr(sampling, "_cast_head_once", lambda m: lambda: None)
    every_token = rollout()
    assert once.completions == every_token.completions and once.logprobs == every_token.logprobs


def test_greedy_sampling_equals_transformers_generate(tiny) -> None:
    prompt = [1, 9, 42, 7]
    s = sample(tiny.model, [prompt], n=1, max_new_tokens=5, temperature=0.0, eos_ids={2}, pad_id=2)
    ref = tiny.model.generate(
        torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=2, pad_token_id=2
    )
    assert s.completions[0] == ref[0, len(prompt) :].tolist()[: len(s.completions[0])]


REWARD_MODULE = "grpo_test_reward"


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A reward that varies between random completions, so tiny-random gets a learning signal."""
    (tmp_path / f"{REWARD_MODULE}.py").write_text(
        "def score(prompt, completion, answer):\n    return float(sum(map(ord, completion)) % 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    yield f"python:{REWARD_MODULE}:score"
    sys.modules.pop(REWARD_MODULE, None)


def grpo_config(out: Path, reward: str, method: str = "lora", **train) -> object:
    fields = {"steps": 3, "batch": 4, "seq_len": 96, "precision": "fp32", "lr": 1e-2, "eval_examples": 4}
    fields.update(train)
    return build_config(
        {
            "model": {"name": "tiny-random"},
            "method": {"method": method, "rank": 4},
            "data": {"train": ["arithmetic"]},
            "train": fields,
            "objective": {
                "task": "grpo",
                "group_size": 4,
                "max_new_tokens": 6,
                "reward": reward,
                "prompts_per_step": 2,
                "kl_beta": 0.05,
            },
            "out": str(out),
        }
    )


def _rows(run: RunDir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mem_bytes", "elapsed_s")}
        for r in run.read_metrics()
    ]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_grpo_resume_is_bit_exact(tmp_path: Path, reward_module: str, method: str) -> None:
    whole = train(grpo_config(tmp_path / "whole", reward_module, method, steps=4, save_every=2))

    def stop_at_3(row):
        if row.get("step") == 3 and "loss" in row:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(grpo_config(tmp_path / "cut", reward_module, method, steps=4, save_every=2), on_log=stop_at_3)
    resumed = resume_run(tmp_path / "cut")
    a, b = RunDir(tmp_path / "whole"), RunDir(tmp_path / "cut")
    assert _rows(a) == _rows(b)
    steps = [r for r in _rows(a) if "loss" in r]
    assert len(steps) == 4 and all(r["grad_norm"] > 0 for r in steps)
    assert {"reward", "reward_std", "accuracy", "completion_len", "kl", "clip_frac"} <= set(steps[0])
    assert whole["final_val"] == resumed["final_val"] and "task_acc" in whole["final_val"]
    art = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    assert (a.root / art).read_bytes() == (b.root / art).read_bytes()


def test_lora_at_bf16_samples_and_steps_over_its_held_base_as_over_the_fp32_one(
    tmp_path: Path, reward_module: str, monkeypatch
) -> None:
    """Rollouts, the adapter-disabled reference and the policy's steps over LoRA's base held in bf16
    (adaptlab.frozen_base) log what the fp32 base logs under bf16 autocast."""
    import adaptlab.train.build as train_build

    train(grpo_config(tmp_path / "held", reward_module, "lora", steps=2, precision="bf16"))
    monkeypatch.setattr(train_build, "hold_frozen_linears", lambda model: 0)
    train(grpo_config(tmp_path / "fp32", reward_module, "lora", steps=2, precision="bf16"))
    held, fp32 = _rows(RunDir(tmp_path / "held")), _rows(RunDir(tmp_path / "fp32"))
    assert held == fp32 and any(r.get("kl", 0) > 0 for r in held)


def test_full_fine_tunings_reference_copy_is_held_in_bf16_and_scores_as_the_fp32_one(
    tmp_path: Path, reward_module: str, monkeypatch
) -> None:
    """Full fine-tuning with a KL term keeps a frozen copy of the base as the reference policy; at bf16
    its Linears are held in bf16 (adaptlab.frozen_base) and every logged figure, the KL included, is the
    one an fp32 copy gives."""
    from adaptlab import frozen_base
    from adaptlab.train import prepare

    setup = prepare(grpo_config(tmp_path / "probe", reward_module, "full", precision="bf16"))
    setup.objective.prepare(setup)
    dtypes = {n: p.dtype for n, p in setup.objective.reference.named_parameters()}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32
    assert {p.dtype for p in setup.model.parameters()} == {torch.float32}  # the policy trains in fp32

    train(grpo_config(tmp_path / "held", reward_module, "full", steps=2, precision="bf16"))
    monkeypatch.setattr(frozen_base, "hold_frozen_linears", lambda model: 0)
    train(grpo_config(tmp_path / "fp32", reward_module, "full", steps=2, precision="bf16"))
    held, fp32 = _rows(RunDir(tmp_path / "held")), _rows(RunDir(tmp_path / "fp32"))
    assert held == fp32 and any(r.get("kl", 0) > 0 for r in held)


def test_group_size_one_is_one_line(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "train",
        "--task",
        "grpo",
        "--model",
        "tiny-random",
        "--group-size",
        "1",
        "--steps",
        "1",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and "group_size" in err and len(err.strip().splitlines()) == 1


def test_a_prompt_longer_than_seq_len_is_one_line(run_cli, tmp_path: Path) -> None:
    task = tmp_path / "t.jsonl"
    task.write_text(
        '{"prompt": "short", "answer": "1"}\n{"prompt": "' + "word " * 200 + '", "answer": "2"}\n'
    )
    code, _, err = run_cli(
        "train",
        "--task",
        "grpo",
        "--model",
        "tiny-random",
        "--data",
        task,
        "--seq-len",
        "64",
        "--steps",
        "1",
        "--out",
        tmp_path / "r",
    )
    assert code == 2 and "t.jsonl:2" in err and "--seq-len 64" in err and len(err.strip().splitlines()) == 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    from adaptlab.sampling import top_p_filter

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    kept = top_p_filter(probs, 0.75)
    torch.testing.assert_close(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0], [0.0, 0.2, 0.3, 0.4]]))
    assert top_p_filter(probs, 1.0) is probs


def test_train_cli_runs_grpo_on_the_embedded_task(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli(
        "train",
        "--task",
        "grpo",
        "--model",
        "tiny-random",
        "--data",
        "arithmetic",
        "--steps",
        "1",
        "--batch",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "4",
        "--seq-len",
        "64",
        "--quiet",
        "--out",
        tmp_path / "r",
    )
    assert code == 0, err
    run = RunDir(tmp_path / "r")
    assert [r["step"] for r in run.read_metrics() if "reward" in r] == [1]
    assert "task_acc" in json.loads(run.summary.read_text())["final_val"]


def test_progress_bar_prints_each_objectives_validation_row(capsys) -> None:
    """A GRPO validation row has task_acc, not val_loss: the bar prints its figures instead of failing."""
    from rich.console import Console
    from rich.progress import Progress

    from adaptlab.cli.train import _Progress

    progress = _Progress(quiet=False)
    progress.bar = Progress(console=Console(stderr=True))
    progress.task = progress.bar.add_task("train", total=2, info="")
    progress.on_log({"step": 1, "tokens": 64, "split": "val", "task_acc": 0.25})
    progress.on_log({"step": 1, "tokens": 64, "split": "val", "val_loss": 2.5})
    progress.on_log({"step": 2, "loss": 1.0, "tokens_per_s": 10.0})
    err = capsys.readouterr().err
    assert "step 1: task acc 0.2500" in err and "step 1: val loss 2.5000" in err


def test_progress_off_a_terminal_is_whole_lines(capsys) -> None:
    """Redirected stderr gets one ended line per logged step, so a later writer's line starts on its own."""
    from adaptlab.cli.train import _Progress

    progress = _Progress(quiet=False)
    progress.total = 4
    progress.on_log({"step": 2, "loss": 1.5, "tokens_per_s": 10.0})
    progress.on_log({"step": 2, "tokens": 64, "split": "val", "val_loss": 2.5})
    assert capsys.readouterr().err.splitlines() == [
        "step 2/4: loss 1.5000  10 tok/s",
        "step 2: val loss 2.5000",
    ]


@pytest.mark.parametrize("exit_code", [0, 3])
def test_a_reward_that_calls_sys_exit_is_one_line_and_keeps_the_checkpoint(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code: int
) -> None:
    """sys.exit in the user's reward (even exit 0) stops the run with exit 2 and one line, not silently."""
    name = "grpo_exiting_reward"
    (tmp_path / f"{name}.py").write_text(
        "import sys\ncalls = 0\n"
        "def score(prompt, completion, answer):\n"
        "    global calls\n    calls += 1\n"
        f"    if calls > 4:  # one step of 2 prompts x 2 completions, then exit\n        sys.exit({exit_code})\n"
        "    return 1.0\n"
    )
    monkeypatch.chdir(tmp_path)
    try:
        code, _, err = run_cli(
            "train", "--task", "grpo", "--model", "tiny-random", "--reward", f"python:{name}:score",
            "--steps", "3", "--save-every", "1", "--batch", "2", "--group-size", "2", "--max-new-tokens", "4",
            "--seq-len", "64", "--quiet", "--out", tmp_path / "r",
        )  # fmt: skip
    finally:
        sys.modules.pop(name, None)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert errors == [
        f"error: reward python:{name}:score called sys.exit({exit_code}) (raised SystemExit); a reward must "
        "return a number, not end the process"
    ]
    run = RunDir(tmp_path / "r")
    latest = run.latest_checkpoint()
    assert latest is not None and latest.name.endswith("1") and not run.summary.exists()


def test_decoding_emits_no_deprecation_warning(tiny) -> None:
    """GRPO rollouts, drift's sampling from the base and serve's decoding pass the KV cache as the installed
    transformers expects: no deprecation line (transformers logs its own once per process, so its
    once-cache is cleared first)."""
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model

    from adaptlab.evaluate.drift import sample_from_base
    from adaptlab.models import load_model
    from adaptlab.sampling import sample
    from adaptlab.serve import Engine, Sampling
    from adaptlab.serve.generation import generate_text

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    level = logger.level
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    peft = get_peft_model(load_model("tiny-random").model, LoraConfig(r=4, target_modules=["q_proj"]))
    prompt = tiny.tokenizer("What is 2 + 2?")["input_ids"]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for model in (tiny.model, peft):
                sample(model, [prompt], n=2, max_new_tokens=4, temperature=1.0, eos_ids=set(), pad_id=0)
            sample_from_base(peft, tiny.tokenizer, ["What is 2 + 2?"], new_tokens=4)
            generate_text(Engine(tiny), "What is 2 + 2?", sampling=Sampling(max_new_tokens=4))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    said = records + [str(w.message) for w in caught]
    assert not [s for s in said if "past_key_values" in s or ("cache" in s and "deprecat" in s)], said
