"""DPO parity with TRL's DPOTrainer: tokenization, log-probs, loss, rewards and margins.

Loss, rewards, accuracies and margins agree within 1e-5 (absolute); summed sequence log-probs (about
-150 here, where one float32 step is 1.5e-5) within 1e-6 relative: TRL computes them through its fused
LM head, adaptlab through cross-entropy on the logits.

The same tiny-random model, rows and reference go through TRL's DPOTrainer.compute_loss and through
adaptlab's DPO objective: LoRA with the adapter-disabled base as reference (sigmoid and ipo), and
full fine-tuning against a separate reference model (adaptlab's precomputed path).
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from adaptlab.config import ObjectiveSpec
from adaptlab.data.preference import _record, collate_pairs, tokenize_pair
from adaptlab.objectives.dpo import DPOObjective, sequence_logps

pytest.importorskip("trl")

TOL = 1e-5
LOGP_RTOL = 1e-6
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@pytest.fixture(scope="module")
def rows(shared_data):
    lines = (shared_data / "preference" / "wordnet_define_pairs.jsonl").read_text().splitlines()[:6]
    return [json.loads(line) for line in lines]


def _trainer(model, tokenizer, rows, loss_type, tmp_path, ref_model=None, peft=False):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in rows
    ]
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        per_device_train_batch_size=len(rows),
        beta=0.2,
        loss_type=[loss_type],
        use_cpu=True,
        bf16=False,
        max_length=None,
    )
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(conversational),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if peft else None,
    )


def _ours(model, batch, loss_type, ref_logps=None):
    objective = DPOObjective(ObjectiveSpec(task="dpo", beta=0.2, loss=loss_type))
    if ref_logps is not None:
        batch = {**batch, "ref_logps": ref_logps}
    loss_sum, sums = objective.loss(SimpleNamespace(model=model), batch)
    n = batch["input_ids"].shape[0] // 2
    return float(loss_sum.detach()) / n, {k: v / n for k, v in sums.items()}


def _trl(trainer, model, rows):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer._metrics["train"].clear()
    loss = float(trainer.compute_loss(model, batch).detach())
    return loss, {k: trainer._metrics["train"][k][-1] for k in METRICS}


def _check(ours, theirs):
    assert ours[0] == pytest.approx(theirs[0], abs=TOL)
    for k in METRICS:
        tol = {"abs": TOL} if k in REWARDS else {"rel": LOGP_RTOL}
        assert ours[1][k] == pytest.approx(theirs[1][k], **tol), k


def _pairs(rows, tokenizer):
    return [tokenize_pair(_record(r, f"rows:{i}", str(i)), tokenizer, 4096) for i, r in enumerate(rows)]


def _perturb(model, which: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if which in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_lora_dpo_equals_trl_with_the_adapter_disabled_reference(tiny, rows, loss_type, tmp_path):
    base = copy.deepcopy(tiny.model)
    trainer = _trainer(base, tiny.tokenizer, rows, loss_type, tmp_path, peft=True)
    model = trainer.model
    _perturb(model, "lora_B")  # policy != reference
    model.train()
    # the same tokens: TRL's prompt/response split is adaptlab's label boundary
    pairs = _pairs(rows, tiny.tokenizer)
    for pair, row in zip(pairs, trainer.train_dataset, strict=True):
        assert pair.chosen.input_ids == row["prompt_ids"] + row["chosen_ids"]
        assert pair.rejected.input_ids == row["prompt_ids"] + row["rejected_ids"]
        assert pair.chosen.labels.count(-100) == len(row["prompt_ids"])
    ours = _ours(model, collate_pairs(pairs, tiny.tokenizer.pad_token_id), loss_type)
    theirs = _trl(trainer, model, rows)
    assert ours[1]["rewards/margins"] != 0.0  # the adapter moved the policy away from the reference
    _check(ours, theirs)


def test_full_dpo_with_precomputed_reference_equals_trl(tiny, rows, tmp_path):
    reference = copy.deepcopy(tiny.model).eval()
    policy = copy.deepcopy(tiny.model)
    _perturb(policy, "mlp", seed=1)
    trainer = _trainer(policy, tiny.tokenizer, rows, "sigmoid", tmp_path, ref_model=reference)
    policy.train()
    batch = collate_pairs(_pairs(rows, tiny.tokenizer), tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trl_ref = torch.cat(trainer.compute_ref_log_probs(reference, trl_batch))
    assert torch.allclose(ref_logps, trl_ref, atol=0, rtol=LOGP_RTOL)
    _check(_ours(policy, batch, "sigmoid", ref_logps), _trl(trainer, policy, rows))
