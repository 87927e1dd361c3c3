"""Examples -> token rows, and the offline tokenizer.

A token row is {"input_ids", "prompt_len", "source_id", "id"}: labels and masks are made
by the collator from `prompt_len` and the row length, never from token values, so an
EOS that equals the pad token keeps its label (masking by token value would drop it).
"""
from __future__ import annotations

import logging
from collections import Counter

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import UserError

logger = logging.getLogger(__name__)

DEMO_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_demo_tokenizer(texts, vocab_size: int = 1024):
    """A byte-level BPE trained on `texts` with the `tokenizers` library: any text
    encodes (bytes as fallback) and decodes back exactly. Deterministic for its input.
    Saved with the run (save_pretrained) so later commands reload the same one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(DEMO_SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **DEMO_SPECIAL_TOKENS)


def tokenize_examples(examples: list[dict], tokenizer, source_id: int, max_seq_length: int,
                      overlong: str = "truncate", add_bos: bool = True) -> tuple[list[dict], Counter]:
    """Token rows for one source/split and counts of what was truncated or dropped."""
    if not examples:
        return [], Counter()
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no eos_token: answers must end with one")
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    prompts = tokenizer([ex["prompt"] for ex in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([ex["answer"] for ex in examples], add_special_tokens=False)["input_ids"]
    rows, counts = [], Counter()
    for ex, prompt, answer in zip(examples, prompts, answers):
        prompt = bos + prompt
        ids = prompt + answer + [eos]
        if len(ids) > max_seq_length:
            if overlong == "drop" or len(prompt) >= max_seq_length:
                counts["dropped"] += 1  # dropped, or a prompt so long no answer token would fit
                continue
            ids = ids[:max_seq_length]
            counts["truncated"] += 1
        rows.append({"input_ids": ids, "prompt_len": len(prompt), "source_id": source_id, "id": ex["id"]})
    counts["kept"] = len(rows)
    return rows, counts
