"""GRPO (group relative policy optimisation, Shao et al. 2024) with verifiable rewards.

Each step takes `prompts_per_step` prompts of the task (data/tasks.py; row order a function of
(seed, step)), samples `group_size` completions of each from the current policy in one batched,
KV-cached decode (sampling.py; each completion row has its own generator, seeded by (seed, step, its
place in the global batch), so a resumed run, and a run on N processes, samples what an uninterrupted
single-process one would), and scores them with the reward (data/rewards.py).

  advantage  A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)       (unbiased std, as TRL)
  ratio      rho_t = exp(log pi(y_t) - log pi_old(y_t))                 (pi_old: the log-probs at sampling time)
  token loss l_t = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) + kl_beta * KL_t
  KL_t       exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3 estimator, as TRL)
  loss       mean over completions of the mean of l_t over the completion's tokens

Log-probs are taken under logits / temperature, on completion tokens only (the end token counts;
the prompt and the padding do not). This is TRL's GRPOTrainer with loss_type="grpo",
scale_rewards="group" (tests/unit/test_grpo.py checks it on identical inputs). The unit of the
step is the completion: the normaliser is the number of completions in the global batch, so the
per-step metrics (reward, accuracy, length, kl, clip fraction) are means over completions.

Reference for the KL (only when kl_beta > 0): the LoRA family uses the same model with its adapter
disabled (no second copy); full fine-tuning keeps a frozen copy of the base in memory, because the
completions are sampled during training, so their reference log-probs cannot be computed beforehand.
Reference and sampling log-probs are computed when the step's completions are sampled, without a graph.

    adaptlab train --task grpo --model smollm2-135m --data arithmetic --steps 20 --out runs/grpo
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from adaptlab import distributed as dist
from adaptlab.config import ObjectiveSpec, RunConfig
from adaptlab.data.rewards import Reward, exact_reward, load_reward
from adaptlab.data.tasks import TaskItem, load_task, render_prompt_ids, split_items
from adaptlab.errors import UserError
from adaptlab.hardware import autocast
from adaptlab.objectives import batch_indices
from adaptlab.objectives.scoring import eos_ids, greedy_accuracy, pad_id
from adaptlab.sampling import Generators, Samples, left_pad, sample

STD_EPS = 1e-4
"""Added to the group's reward std before dividing (TRL's value)."""
DEFAULT_TASK = "arithmetic"
SAMPLE_SEED_STRIDE = 1_000_003
"""Sampling seeds: (seed * stride + step) * stride + row, modulo 2**64, distinct for every (seed, step,
row) while a step has fewer than `stride` rows and the seed is below 2**64 / stride**2 (about 18 million)."""


def row_generators(seed: int, step: int, positions: list[int], group_size: int) -> list[torch.Generator]:
    """One generator per completion row of these prompts (their positions in the step's global batch):
    what a row draws depends on (seed, step, its place in the global batch) only, so a resumed run and a
    run on any number of processes sample the same completions."""
    base = (seed * SAMPLE_SEED_STRIDE + step) * SAMPLE_SEED_STRIDE
    return [  # torch takes seeds below 2**64: a large run seed wraps there
        torch.Generator().manual_seed((base + p * group_size + member) % 2**64)
        for p in positions
        for member in range(group_size)
    ]


@dataclass(frozen=True)
class Prompt:
    """A task item with its prompt rendered as token ids."""

    item: TaskItem
    ids: tuple[int, ...]


def group_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each row's group std), both (N,), for rewards (N,) in groups of group_size rows."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    adv = (grouped - mean) / (std + STD_EPS)
    return adv.reshape(-1), std.expand_as(grouped).reshape(-1)


def per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    kl_beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, clipped) per token, each (B, C), for log-probs (B, C) and advantages (B,)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped_ratio = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    clipped = (ratio * adv > clipped_ratio * adv).float()  # tokens where the clip bound is taken
    kl = torch.zeros_like(logps)
    if kl_beta > 0.0 and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + kl_beta * kl
    return loss, kl, clipped


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's completion tokens: (B, C) -> (B,)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def completion_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """log pi(token) of each completion token under logits / temperature: (B, C).

    Rows are [left-padded prompt | right-padded completion], so the completion columns are the last
    C, and only the logits that predict them are computed.
    """
    c = batch["completion_mask"].size(1)
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
        logits_to_keep=c + 1,
    ).logits[:, :-1]  # (B, C, V): position t predicts token t + 1
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, batch["input_ids"][:, -c:, None])[..., 0]


def check_prompt_lengths(prompts: list[Prompt], seq_len: int, max_new_tokens: int) -> None:
    """A prompt whose tokens plus the completion exceed --seq-len is refused, naming it."""
    room = seq_len - max_new_tokens
    for p in prompts:
        if len(p.ids) > room:
            raise UserError(
                f"task row {p.item.id}: the prompt is {len(p.ids)} tokens, longer than --seq-len {seq_len} "
                f"minus --max-new-tokens {max_new_tokens}: raise --seq-len, lower --max-new-tokens or "
                "shorten the prompt"
            )


def task_prompts(source: str, split: str, tokenizer: Any) -> list[Prompt]:
    """The prompts of one split of a task, rendered with the tokenizer's chat template."""
    items = split_items(load_task(source), split)  # type: ignore[arg-type]
    return [Prompt(it, tuple(render_prompt_ids(it.prompt, tokenizer))) for it in items]


def task_source(config: RunConfig) -> str:
    """The task a GRPO run trains on: its one data source, or the embedded arithmetic task by default."""
    from adaptlab.config import DataSpec

    sources = config.data.train
    if sources == DataSpec().train:  # no --data given
        return DEFAULT_TASK
    if len(sources) != 1:
        raise UserError(
            "--task grpo takes one --data source: arithmetic or a JSONL file of prompt/answer rows"
        )
    return sources[0]


def rollout_batch(prompts: list[Prompt], samples: Samples, pad: int) -> dict[str, torch.Tensor]:
    """Rows [left-padded prompt | right-padded completion] with masks, positions and sampling log-probs."""
    prompt_ids, prompt_mask = left_pad([prompts[i].ids for i in samples.prompt_index], pad)
    width = max(len(c) for c in samples.completions)
    comp = torch.full((len(samples.completions), width), pad, dtype=torch.long)
    comp_mask = torch.zeros((len(samples.completions), width), dtype=torch.float32)
    old = torch.zeros((len(samples.completions), width), dtype=torch.float32)
    for r, (ids, lps) in enumerate(zip(samples.completions, samples.logprobs, strict=True)):
        comp[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        comp_mask[r, : len(ids)] = 1.0
        old[r, : len(ids)] = torch.tensor(lps, dtype=torch.float32)
    mask = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, comp], dim=1),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "completion_mask": comp_mask,
        "old_logps": old,
    }


class GRPOObjective:
    """Group-normalised, clipped policy gradient on sampled completions scored by a verifiable reward."""

    name = "grpo"
    zero_gradient_ok = True
    """A step whose groups all agree has no advantage and so no gradient: that is not a collapse."""

    def __init__(self, spec: ObjectiveSpec) -> None:
        self.spec = spec
        self.reward: Reward = load_reward(spec.reward)
        self.reference: Any = None  # full fine-tuning with kl_beta > 0: a frozen copy of the base

    # -- data -------------------------------------------------------------------------------------

    def build_data(self, config: RunConfig, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
        source = task_source(config)
        train = task_prompts(source, "train", tokenizer)
        test = task_prompts(source, "test", tokenizer)
        check_prompt_lengths(train + test, config.train.seq_len, self.spec.max_new_tokens)
        return train, test[: config.train.eval_examples]

    def prepare(self, setup: Any) -> None:
        if self.spec.kl_beta > 0.0 and not setup.config.method.is_lora:
            self.reference = load_reference_copy(setup.config.model.name, setup.device, setup.precision)

    def prompts_per_step(self, setup: Any) -> int:
        t = setup.config.train
        return self.spec.prompts_per_step or t.batch * t.grad_accum

    # -- a step -----------------------------------------------------------------------------------

    def micro_batches(self, setup: Any, step: int) -> list[dict[str, torch.Tensor]]:
        """Sample this rank's prompts' groups, score them, and cut them into micro-batches of `batch` rows."""
        t = setup.config.train
        idx = batch_indices(step, len(setup.train_examples), self.prompts_per_step(setup), t.seed)
        prompts = [setup.train_examples[i] for i in dist.rank_slice(idx, setup.world)]
        positions = dist.rank_slice(list(range(len(idx))), setup.world)
        batch = self.rollouts(setup, prompts, row_generators(t.seed, step, positions, self.spec.group_size))
        n = batch["input_ids"].size(0)
        return [{k: v[lo : lo + t.batch] for k, v in batch.items()} for lo in range(0, n, t.batch)]

    def rollouts(self, setup: Any, prompts: list[Prompt], generator: Generators) -> dict[str, torch.Tensor]:
        """The scored completions of `prompts` as one batch of rows (advantages, rewards, log-probs)."""
        s, tok = self.spec, setup.tokenizer
        model = dist.unwrap(setup.model)
        with autocast(setup.device, setup.precision):
            samples = sample(
                model,
                [p.ids for p in prompts],
                n=s.group_size,
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                eos_ids=eos_ids(model, tok),
                pad_id=pad_id(tok),
                generator=generator,
            )
        texts = [tok.decode(c, skip_special_tokens=True) for c in samples.completions]
        items = [prompts[i].item for i in samples.prompt_index]
        rewards = torch.tensor(
            [self.reward(it.prompt, x, it.answer) for it, x in zip(items, texts, strict=True)]
        )
        advantages, group_std = group_advantages(rewards, s.group_size)
        batch = rollout_batch(prompts, samples, pad_id(tok))
        batch.update(
            advantages=advantages,
            reward=rewards,
            group_std=group_std,
            correct=torch.tensor(
                [exact_reward(it.prompt, x, it.answer) for it, x in zip(items, texts, strict=True)]
            ),
        )
        if s.kl_beta > 0.0:
            batch["ref_logps"] = self.reference_logps(setup, batch)
        return batch

    @torch.no_grad()
    def reference_logps(self, setup: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p_ref of the completion tokens: the adapter disabled (LoRA family) or the frozen base copy."""
        out = []
        for lo in range(0, batch["input_ids"].size(0), setup.config.train.batch):
            part = {k: v[lo : lo + setup.config.train.batch].to(setup.device) for k, v in batch.items()}
            with self.reference_model(setup) as ref, autocast(setup.device, setup.precision):
                out.append(completion_logps(ref, part, self.spec.temperature).float().cpu())
        return torch.cat(out)

    @contextlib.contextmanager
    def reference_model(self, setup: Any) -> Iterator[Any]:
        if self.reference is not None:
            yield self.reference
            return
        model = dist.unwrap(setup.model)
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)

    def normaliser(self, setup: Any, micro: list[dict[str, torch.Tensor]]) -> float:
        return int(dist.all_reduce_sum(sum(int(b["advantages"].numel()) for b in micro), setup.device))

    def loss(self, setup: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["completion_mask"]
        logps = completion_logps(setup.model, batch, self.spec.temperature)
        tok_loss, kl, clipped = per_token_loss(
            logps,
            batch["old_logps"],
            batch["advantages"],
            self.spec.clip_eps,
            self.spec.kl_beta,
            batch.get("ref_logps"),
        )
        per_seq = sequence_means(tok_loss, mask)  # (B,)
        metrics = {
            "reward": float(batch["reward"].sum()),
            "reward_std": float(batch["group_std"].sum()),
            "accuracy": float(batch["correct"].sum()),
            "completion_len": float(mask.sum()),
            "kl": float(sequence_means(kl.detach(), mask).sum()),
            "clip_frac": float(sequence_means(clipped, mask).sum()),
        }
        return per_seq.sum(), metrics

    # -- evaluation and state -----------------------------------------------------------------------

    def validation(self, setup: Any) -> dict[str, float]:
        """Greedy accuracy (pass@1) on held-out prompts of the task."""
        if not setup.val_examples:
            return {}
        model = dist.unwrap(setup.model)
        with autocast(setup.device, setup.precision):
            acc = greedy_accuracy(
                model,
                setup.tokenizer,
                setup.val_examples,
                self.reward,
                self.spec.max_new_tokens,
                setup.config.train.batch * self.spec.group_size,
            )
        return {"task_acc": acc}

    def state_dict(self) -> dict[str, Any]:
        return {}  # sampling is seeded by (seed, step): nothing to carry

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def load_reference_copy(name: str, device: Any, precision: str) -> Any:
    """Full fine-tuning's frozen copy of the base for the KL penalty. It only ever runs under the run's
    autocast, so at bf16 its Linears are held in bf16 (frozen_base.py): a checkpoint stored in bf16 is
    loaded as stored, never whole in fp32."""
    from adaptlab.frozen_base import hold_frozen_linears, load_held
    from adaptlab.models import load_model

    model = (load_held(name, device) if precision == "bf16" else load_model(name, device=device)).model
    model.eval().requires_grad_(False)
    if precision == "bf16":
        hold_frozen_linears(model)  # an fp32 checkpoint: its Linears converted, the file's map let go
    return model
