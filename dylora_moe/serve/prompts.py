"""Request text to token ids, as the model saw text in training.

Completions: each prompt led by BOS, as `generate` and training lead it. Chat: the
tokenizer's chat template when the base has one; otherwise the training template
(Alpaca's, data/formatting.py), the last user message as the instruction and any earlier
messages as its input, one `role: text` paragraph each.
"""
from __future__ import annotations

from ..data.formatting import alpaca_prompt
from .protocol import APIError


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of those."""
    if isinstance(prompt, str):
        return [with_bos(tokenizer, prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [checked_ids(tokenizer, prompt)]
    if not prompt:
        raise APIError(400, "prompt: expected a non-empty string or list", param="prompt")
    return [with_bos(tokenizer, p) if isinstance(p, str) else checked_ids(tokenizer, p) for p in prompt]


def chat_prompt(tokenizer, messages) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception as error:  # noqa: BLE001 - a template's own refusal (e.g. roles must alternate)
            raise APIError(400, f"messages: the chat template refused them ({error})", param="messages") from error
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    last = messages[-1]
    if last.role != "user":
        raise APIError(400, "messages: the last message must be the user's (this base has no chat template; "
                       "the training template answers one instruction)", param="messages")
    context = "\n\n".join(f"{m.role}: {m.text()}" for m in messages[:-1])
    return with_bos(tokenizer, alpaca_prompt(last.text(), context or None))


def with_bos(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + list(ids)


def checked_ids(tokenizer, ids: list[int]) -> list[int]:
    if not ids:
        raise APIError(400, "prompt: an empty list of token ids", param="prompt")
    vocab = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt: token ids {bad[:3]} outside the vocabulary 0..{vocab - 1}", param="prompt")
    return list(ids)
