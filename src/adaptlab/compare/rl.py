"""The RL studies: GRPO with LoRA ranks 1, 4, 16 against full fine-tuning (`rl`), and SFT on the answers
against GRPO (`sft-vs-rl`), each arm's task accuracy next to its forgetting.

Every arm trains on the same task prompts in the same seeded order for the same number of steps:
GRPO samples `group_size` completions of `prompts_per_step` prompts a step, so the arms see equal
episodes (steps x prompts x group); the SFT arm trains on the same prompts with their answers as
the response. Each run is evaluated on the task's held-out prompts: pass@1 (greedy) with a bootstrap
95% interval and its paired difference from the base (evaluate/task.py), and drift, KL(base || tuned)
over text the base writes from the general prompts, as forgetting (evaluate/drift.py).

Learning rates (RL_LRS): full fine-tuning at FULL_RL_LR, every LoRA rank at 10x that, with alpha
fixed at 32 so the update scale is alpha/r, the parametrisation under which Schulman et al. (2025,
"LoRA Without Regret") found the best LR about the same for every rank and ~10x full fine-tuning's.
The verdict on "rank 1 suffices for RL" is findings.verdict's: non-inferiority of rank 1 to full
within findings.claims.RL_PASS1_MARGIN, on the paired 95% interval of their pass@1 difference
(agrees when it lies above -margin, disagrees when it lies wholly below, else cannot tell).

With seeds > 1 every arm trains once per seed (seed s of every arm samples with the same seed; runs
RUN-s0, RUN-s1, ...); a row's figures are means over seeds and its intervals pair the seeds as well as
the prompts (evaluate.stats.contrast_ci). One seed is reported as unreplicated.

A killed study picks up where it stopped: an arm whose run directory holds a finished run with the
same config is reused, an unfinished one resumes from its newest checkpoint.

    adaptlab compare --study rl --model smollm2-135m --data arithmetic --out runs/rl
    python bench/rl_study.py            # the same study, small enough for a 2-core CPU
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.compare.arms import check_seq_len_fits
from adaptlab.config import COMPARE_SEEDS
from adaptlab.errors import UserError
from adaptlab.findings import judge_reported, verdict
from adaptlab.findings.claims import RANK1_RL

FULL_RL_LR = 1e-5
"""GRPO peak LR of full fine-tuning; LoRA arms use LORA_RL_FACTOR x it."""
LORA_RL_FACTOR = 10.0
LORA_RL_ALPHA = 32.0
SFT_LR = {"full": 2e-5, "lora": 2e-4}
"""SFT arm LRs: the project's default rule (config.default_lr)."""
RL_STUDIES = ("rl", "sft-vs-rl")


@dataclass
class RLArm:
    """One arm: the objective (grpo | sft), the method and its rank, and the peak LR."""

    name: str
    task: str
    method: str
    rank: int | None
    lr: float


@dataclass
class RLStudy:
    """The shared settings of every arm of an RL study."""

    study: str = "rl"
    model: str = "smollm2-135m"
    task: str = "arithmetic"
    steps: int = 12
    prompts_per_step: int = 4
    group_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 0.7
    batch: int = 8
    seq_len: int = 96
    eval_prompts: int = 100
    eval_k: int = 1
    drift_tokens: int = 32
    seed: int = 0
    seeds: int = COMPARE_SEEDS
    """Replicates per arm, trained with seeds seed, seed + 1, ..."""
    full_lr: float = FULL_RL_LR
    ranks: tuple[int, ...] = (1, 4, 16)
    extra: dict[str, Any] = field(default_factory=dict)

    def arms(self) -> list[RLArm]:
        lora_lr = self.full_lr * LORA_RL_FACTOR
        if self.study == "rl":
            return [RLArm(f"lora-r{r}", "grpo", "lora", r, lora_lr) for r in self.ranks] + [
                RLArm("full", "grpo", "full", None, self.full_lr)
            ]
        if self.study == "sft-vs-rl":
            r = max(self.ranks)
            return [
                RLArm(f"grpo-lora-r{r}", "grpo", "lora", r, lora_lr),
                RLArm(f"sft-lora-r{r}", "sft", "lora", r, SFT_LR["lora"]),
                RLArm("grpo-full", "grpo", "full", None, self.full_lr),
                RLArm("sft-full", "sft", "full", None, SFT_LR["full"]),
            ]
        raise UserError(f"unknown RL study {self.study!r}; choose {', '.join(RL_STUDIES)}")

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise UserError(f"--seeds {self.seeds}: an RL study needs at least 1 seed per arm")


def sft_answers_file(task: str, out: Path) -> Path:
    """The task's train split as prompt/response records (response = the answer), for the SFT arm."""
    from adaptlab.data.tasks import load_task, split_items

    path = out / "sft-answers.jsonl"
    with path.open("w") as fh:
        for it in split_items(load_task(task), "train"):
            fh.write(json.dumps({"id": it.id, "prompt": it.prompt, "response": it.answer}) + "\n")
    return path


def run_config(
    study: RLStudy, arm: RLArm, out: Path, sft_data: Path | None, seed: int | None = None
) -> dict[str, Any]:
    """The RunConfig fields of one run of an arm (seed: the run's, default the study's); the SFT arm
    takes one answer per prompt the GRPO arms sample."""
    method: dict[str, Any] = {"method": arm.method}
    if arm.rank is not None:
        method.update(rank=arm.rank, alpha=LORA_RL_ALPHA, targets="all-linear")
    train = {
        "steps": study.steps,
        "batch": study.batch,
        "seq_len": study.seq_len,
        "lr": arm.lr,
        "seed": study.seed if seed is None else seed,
        "warmup": 0.0,
        "eval_examples": 8,
    }
    if arm.task == "sft":
        train["batch"] = study.prompts_per_step
        return {
            "model": {"name": study.model},
            "method": method,
            "data": {"train": [str(sft_data)], "val_frac": 0.0, "test_frac": 0.0},
            "train": train,
            "out": str(out),
        }
    return {
        "model": {"name": study.model},
        "method": method,
        "data": {"train": [study.task]},
        "train": train,
        "objective": {
            "task": "grpo",
            "group_size": study.group_size,
            "max_new_tokens": study.max_new_tokens,
            "temperature": study.temperature,
            "prompts_per_step": study.prompts_per_step,
        },
        "out": str(out),
    }


def _load(study: RLStudy, run_dir: Path | None) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, evaluate()'s base arguments) of a run, or of the base when run_dir is None."""
    from adaptlab.artifacts import load_tuned, resolve
    from adaptlab.models import load_model

    if run_dir is None:
        base = load_model(study.model)
        return base.model, base.tokenizer, {}
    tuned, ref = load_tuned(resolve(run_dir), study.model)
    kwargs = {} if ref.kind == "adapter" else {"base_model": load_model(study.model).model}
    return tuned.model, tuned.tokenizer, kwargs


def evaluate_arm(study: RLStudy, run_dir: Path | None, items: list[Any]) -> tuple[Any, dict[str, Any] | None]:
    """(task scores on the held-out items, drift section) of a run; the base alone has no drift."""
    from adaptlab.evaluate import evaluate
    from adaptlab.evaluate.task import score_task

    model, tokenizer, kwargs = _load(study, run_dir)
    scores = score_task(
        model, tokenizer, items, k=study.eval_k, max_new_tokens=study.max_new_tokens, seed=study.seed
    )
    if run_dir is None:
        return scores, None
    drift = evaluate(
        model, tokenizer, drift_kl=True, drift_new_tokens=study.drift_tokens, seed=study.seed, **kwargs
    )["drift"]
    return scores, drift


def arm_row(
    arm: RLArm, scores: Any, base: Any, drift: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """One table row: accuracy with its paired gain over the base (95% CI), drift, cost."""
    from adaptlab.evaluate.task import task_section

    t = task_section(scores, base)
    return {
        "arm": arm.name,
        "task": arm.task,
        "method": arm.method,
        "rank": arm.rank,
        "lr": arm.lr,
        "pass1": t["pass1"],
        "delta_pass1": t["delta"]["pass1"],
        "delta_pass1_ci95": t["delta"]["pass1_ci95"],
        "mean_reward_k": t["mean_reward_k"],
        "drift_kl": drift["kl"],
        "drift_ci95": drift["ci95"],
        "train_s": summary.get("train_s"),
        "trainable_params": summary.get("trainable_params"),
    }


def combine_seeds(per_seed: list[dict[str, Any]], scores: list[Any], base: Any) -> dict[str, Any]:
    """An arm's row from its rows per seed: means over seeds; the gain's interval paired over the prompts
    and the seeds, drift's per-seed interval widened by the seed-to-seed spread. One seed: its row."""
    from adaptlab.evaluate import stats

    seeds = len(per_seed)
    if seeds == 1:
        return {**per_seed[0], "seeds": 1}
    acc = np.stack([s.pass1 for s in scores])  # (seeds, prompts)
    gain = stats.contrast_ci([(1.0, acc, np.ones_like(acc)), (-1.0, base.pass1, np.ones_like(base.pass1))])
    drifts = np.array([r["drift_kl"] for r in per_seed])
    half_eval = float(np.mean([(r["drift_ci95"][1] - r["drift_ci95"][0]) / 2 for r in per_seed]))
    half = float(np.hypot(half_eval, stats.t95(seeds - 1) * drifts.std(ddof=1) / np.sqrt(seeds)))
    mean = lambda key: float(np.mean([r[key] for r in per_seed]))  # noqa: E731
    return {
        **{k: per_seed[0][k] for k in ("arm", "task", "method", "rank", "lr", "trainable_params")},
        "pass1": mean("pass1"),
        "delta_pass1": gain["value"],
        "delta_pass1_ci95": gain["ci95"],
        "mean_reward_k": mean("mean_reward_k"),
        "drift_kl": float(drifts.mean()),
        "drift_ci95": [float(drifts.mean()) - half, float(drifts.mean()) + half],
        "train_s": sum(r["train_s"] or 0 for r in per_seed),
        "seeds": seeds,
        "per_seed": per_seed,
    }


def rank1_vs_full(scores: dict[str, Any]) -> dict[str, Any] | None:
    """pass@1(rank 1) - pass@1(full), paired over the same held-out prompts and seeds (scores: per arm,
    one TaskScores per seed), judged by findings.verdict's rule for "rank 1 suffices for RL"
    (non-inferiority within RL_PASS1_MARGIN)."""
    from adaptlab.evaluate import stats

    if "lora-r1" not in scores or "full" not in scores:
        return None
    a = np.stack([s.pass1 for s in scores["lora-r1"]])  # (seeds, prompts)
    b = np.stack([s.pass1 for s in scores["full"]])
    d = stats.contrast_ci([(1.0, a, np.ones_like(a)), (-1.0, b, np.ones_like(b))])
    v = judge_reported(RANK1_RL, d, ("lora-r1", "full"), a.shape[1], a.shape[0])
    return {
        "delta_pass1": d["value"],
        "ci95": d["ci95"],
        "verdict": v.verdict,
        "verdict_text": v.text,
        "margin": RANK1_RL.margin,
        "matched": v.verdict == "agrees",
        "rule": f"rank 1 matches full when the 95% interval of pass@1(r1) - pass@1(full) lies above "
        f"-{RANK1_RL.margin:g} (non-inferiority); wholly below it, it does not; otherwise cannot tell",
    }


def train_or_reuse(config: Any, on_event: Any = print) -> dict[str, Any]:
    """An arm's training summary: its finished run reused when the run directory holds one with this
    config, an unfinished one resumed, anything else (another config, no run) trained afresh."""
    from adaptlab.rundir import RunDir
    from adaptlab.train import resume_run, train

    rd = RunDir(config.out)
    same = rd.holds_config(config.to_yaml())
    if same and rd.is_finished():
        on_event(f"{Path(config.out).name}: finished earlier with the same config, reused")
        return rd.read_summary()
    if same:
        on_event(f"{Path(config.out).name}: resuming")
        return resume_run(config.out)
    return train(config, overwrite=True)


def run_study(study: RLStudy, out: str | Path, on_event: Any = print) -> dict[str, Any]:
    """Train every arm, evaluate it and the base, write OUT/results.json and OUT/report.md; return the results."""
    from adaptlab.config import build_config
    from adaptlab.evaluate.task import task_items

    check_seq_len_fits(study.model, study.seq_len)
    root = Path(out)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    arms = study.arms()
    sft_data = sft_answers_file(study.task, root) if any(a.task == "sft" for a in arms) else None
    items = task_items(study.task, study.eval_prompts)
    on_event("evaluate the base")
    base, _ = evaluate_arm(study, None, items)
    rows, scores = [], {}
    for arm in arms:
        scores[arm.name], per_seed = [], []
        for s in range(study.seeds):
            run = f"{arm.name}-s{s}" if study.seeds > 1 else arm.name
            run_dir = root / "runs" / run
            on_event(f"train {run} ({arm.task}, {arm.method}, lr {arm.lr:g})")
            config = run_config(study, arm, run_dir, sft_data, seed=study.seed + s)
            summary = train_or_reuse(build_config(config), on_event)
            on_event(f"evaluate {run}")
            task_scores, drift = evaluate_arm(study, run_dir, items)
            scores[arm.name].append(task_scores)
            per_seed.append({**arm_row(arm, task_scores, base, drift or {}, summary), "seed": study.seed + s})
        rows.append(combine_seeds(per_seed, scores[arm.name], base))
        on_event(json.dumps({k: v for k, v in rows[-1].items() if k != "per_seed"}))
    results = {
        "study": asdict(study),
        "seeds": study.seeds,
        "base": {"pass1": float(base.pass1.mean()), "n": len(items)},
        "arms": rows,
        "rank1_vs_full": rank1_vs_full(scores),
    }
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (root / "report.md").write_text(render(results))
    return results


def _seeds_line(seeds: int) -> str:
    if seeds == 1:
        return "Seeds per arm: 1 (unreplicated: every figure is one seed's, seed-to-seed noise is not in it)."
    return f"Seeds per arm: {seeds}; figures are means over seeds, intervals paired over prompts and seeds."


def render(results: dict[str, Any]) -> str:
    """The study as a Markdown table and its verdicts."""
    s = results["study"]
    lines = [
        f"# {s['study']} study: {s['model']} on {s['task']}",
        "",
        f"{s['steps']} steps x {s['prompts_per_step']} prompts x {s['group_size']} completions "
        f"({s['steps'] * s['prompts_per_step'] * s['group_size']} episodes per GRPO arm); "
        f"held-out prompts: {results['base']['n']}; base pass@1 {results['base']['pass1']:.3f}.",
        "",
        _seeds_line(results.get("seeds", 1)),
        "",
        "| arm | objective | LR | pass@1 | gain over base [95% CI] | drift KL [95% CI] | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["arms"]:
        lo, hi = r["delta_pass1_ci95"]
        dlo, dhi = r["drift_ci95"]
        lines.append(
            f"| {r['arm']} | {r['task']} | {r['lr']:.0e} | {r['pass1']:.3f} | {r['delta_pass1']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] | {r['drift_kl']:.4f} [{dlo:.4f}, {dhi:.4f}] | {r['train_s'] or 0:.0f} |"
        )
    r = results.get("rank1_vs_full")
    if r:
        lo, hi = r["ci95"]
        v = verdict(RANK1_RL, results)
        lines += [
            "",
            f"rank 1 - full pass@1: {r['delta_pass1']:+.3f} [{lo:+.3f}, {hi:+.3f}]; "
            f'"{RANK1_RL.claim}" (non-inferiority within {RANK1_RL.margin:g}): {v.text}.',
        ]
    return "\n".join(lines) + "\n"
