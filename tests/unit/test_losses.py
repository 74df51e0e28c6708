"""The chunked cross-entropy (adaptlab.losses) against plain full-logits cross-entropy on tiny-random.

Tolerances: fp32 loss within 1e-6 relative, gradients within 1e-5 of the largest gradient entry
(max |a - b| / max |a| per parameter). bf16 autocast: loss within 1e-2 relative (the logits are
rounded to bf16 before the fp32 softmax on both sides, but chunking changes the order of sums).
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

from adaptlab import losses
from adaptlab.config import MethodSpec
from adaptlab.methods import apply_method

IGNORE = losses.IGNORE_INDEX


def plain_loss_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def make_batch(vocab: int, rows: int = 2, width: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[0, :17] = IGNORE  # a prompt without loss
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0  # a padded row
    labels[1, 100:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def build(tiny, method: str, targets: str = "all-linear"):
    model = copy.deepcopy(tiny.model)
    if method == "full":
        return model.train()
    if "lm_head" in targets:  # adaptlab's targets exclude the head; peft can still put a LoRA on it
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets.split(",")))
    else:
        model = apply_method(model, MethodSpec(method=method, rank=4, targets=targets), seed=0)
    # LoRA B starts at zero; give it values so the adapter's gradients are not trivially related
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


@pytest.mark.parametrize(
    ("method", "targets"), [("full", "all-linear"), ("lora", "all-linear"), ("lora", "q_proj,v_proj,lm_head")]
)
def test_chunked_loss_and_gradients_equal_plain_fp32(tiny, method, targets):
    model = build(tiny, method, targets)
    assert losses.chunk_tokens(model.config.vocab_size) < 2 * 128  # several chunks per batch
    batch = make_batch(model.config.vocab_size)
    ref = plain_loss_sum(model, batch)
    ref_grads = grads(model, ref)
    ours, n = losses.token_loss_sum(model, batch)
    our_grads = grads(model, ours)
    assert n == int((F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:] != IGNORE).sum())
    assert abs(float(ours) - float(ref)) <= 1e-6 * abs(float(ref))
    assert our_grads.keys() == ref_grads.keys() and ref_grads
    for k, g in ref_grads.items():
        err = float((our_grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30))
        assert err <= 1e-5, (k, err)


def test_tied_head_gets_both_gradients(tiny):
    model = build(tiny, "full")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2 ties them
    batch = make_batch(model.config.vocab_size)
    ref = grads(model, plain_loss_sum(model, batch))["model.embed_tokens.weight"]
    ours = grads(model, losses.token_loss_sum(model, batch)[0])["model.embed_tokens.weight"]
    # the embedding rows of unused tokens get only the head's softmax gradient: non-zero everywhere
    assert torch.count_nonzero(ours) == ours.numel()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_bf16_autocast_loss_within_tolerance(tiny):
    model = build(tiny, "lora")
    batch = make_batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain_loss_sum(model, batch)
        ours, _ = losses.token_loss_sum(model, batch)
    ref_grads = grads(model, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = losses.token_loss_sum(model, batch)
    our_grads = grads(model, ours)
    assert abs(float(ours) - float(ref)) <= 1e-2 * abs(float(ref))
    for k, g in ref_grads.items():
        cos = F.cosine_similarity(our_grads[k].flatten().double(), g.flatten().double(), dim=0)
        assert cos > 0.99, (k, float(cos))


def test_next_token_nll_equals_plain_per_position(tiny):
    model = tiny.model
    batch = make_batch(model.config.vocab_size)
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
        ours = losses.next_token_nll(model, batch, targets)
    assert ours.shape == targets.shape
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_hidden_states_give_the_logits_through_the_head(tiny):
    model = tiny.model
    batch = make_batch(model.config.vocab_size)
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with losses.hidden_states(model) as head:
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert hidden.shape[-1] == model.config.hidden_size
        assert torch.allclose(head(hidden[:, :5]), logits[:, :5], atol=1e-5)
    # the head is itself again afterwards
    assert model(input_ids=batch["input_ids"][:, :4]).logits.shape[-1] == model.config.vocab_size


class _LiveLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """Most tensors of at least `numel` elements alive at once while the mode is on: fresh storages
    only, not views or in-place results of an op's inputs."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.live, self.most = numel, set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self.live:
                    self.live.add(ptr)
                    weakref.finalize(t, self.live.discard, ptr)
                    self.most = max(self.most, len(self.live))
        return out


@pytest.mark.parametrize("want", [(True, False, False), (True, True, False), (False, False, False)])
def test_one_chunk_of_logits_alive_at_a_time(want):
    hidden, vocab, chunk = 64, 4096, 32
    h = torch.randn(5 * chunk, hidden, requires_grad=want[0])
    w = torch.randn(vocab, hidden, requires_grad=want[1])
    y = torch.randint(0, vocab, (5 * chunk,))
    with _LiveLogits(chunk * vocab // 2) as mode:
        losses.LinearCrossEntropy.apply(h, w, None, y, chunk, want)
    assert mode.most == 1 + want[1]  # the chunk, and the head's (vocab x hidden) gradient when it trains


def test_token_nll_keeps_one_chunk_of_logits(tiny):
    model = tiny.model
    head = model.get_output_embeddings()
    chunk = losses.chunk_tokens(head.out_features)
    hidden = torch.randn(3 * chunk, head.in_features)
    targets = torch.randint(0, head.out_features, (3 * chunk,))
    with torch.no_grad(), _LiveLogits(chunk * head.out_features // 2) as mode:
        losses.token_nll(hidden, head, targets)
    assert mode.most == 1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_bf16_step_saves_every_linear_copy_but_not_the_heads(tiny, method):
    """What `adaptlab plan` counts under bf16 autocast: each Linear's bf16 weight is saved for backward,
    the tied head's is cast inside the loss and gone when it returns."""
    model = build(tiny, method)
    batch = make_batch(model.config.vocab_size)
    head = model.get_output_embeddings().weight
    linears = {tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        losses.token_loss_sum(model, batch)
    bf16 = {tuple(t.shape) for t in saved if t.dtype == torch.bfloat16}
    assert linears <= bf16
    assert tuple(head.shape) not in bf16
