"""Instruction records -> token ids with the tokenizer's chat template, loss on the response only.

The prompt is everything the template renders before the last (assistant) message, with the
generation prompt; its tokens get label IGNORE_INDEX. Tokenizers without a chat template fall
back to "prompt\\n\\nresponse<eos>". Rows longer than seq_len are cut from the right.
"""

from __future__ import annotations

from typing import Any

from adaptlab.data.example import IGNORE_INDEX, Example
from adaptlab.data.sources import Document


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, str]:
    """(prompt text, full text) for a conversation whose last message is the assistant's response."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            return prompt, full
        # Some templates render the last turn differently once it is complete; fall back to concatenation.
        return prompt, prompt + messages[-1]["content"] + (tokenizer.eos_token or "")
    prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
    return prompt, prompt + messages[-1]["content"] + (tokenizer.eos_token or "")


def encode_chat(doc: Document, tokenizer: Any, seq_len: int) -> Example:
    prompt, full = render_chat(list(doc.messages), tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    n_prompt = (
        len(prompt_ids) if full_ids[: len(prompt_ids)] == prompt_ids else _common_prefix(prompt_ids, full_ids)
    )
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]
    return Example(full_ids[:seq_len], labels[:seq_len])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
