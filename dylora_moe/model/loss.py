"""Next-token cross-entropy, plain or chunked.

CodeGemma's 256,000-token vocabulary makes the logits the largest tensor of a step
(batch 4 x 1024: 1 GiB in bf16, 2 GiB more in fp32 for the loss, and the same again for
the gradient). The chunked loss never builds them whole: it runs the LM head on a few
thousand tokens at a time, each chunk under activation checkpointing, so the backward
recomputes one chunk's logits at a time too. Same loss and gradients as the plain one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logits per chunk when the size is automatic: 2**28 logits are ~3 GiB in flight (bf16
# logits, their fp32 copy and its gradient). At CodeGemma's 256k vocabulary that is ~1k
# tokens: measured on an H200 (plan.py's runs), 1024-token chunks peaked 2.4 GiB lower
# than 4096-token ones at batch 2 x 1024, and each chunk is still a large matmul.
AUTO_CHUNK_LOGITS = 2**28


def auto_chunk_tokens(vocab_size: int) -> int:
    """Tokens per loss chunk for `loss_chunk_tokens=None`: 0 (plain loss) below a 32k
    vocabulary, where the logits are not what fills memory; else 512 to 4096 tokens,
    fewer for larger vocabularies."""
    if vocab_size < 32_000:
        return 0
    return max(512, min(4096, AUTO_CHUNK_LOGITS // vocab_size))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None):
    """Next-token cross-entropy summed over label tokens, divided by their count (or by
    `num_items_in_batch`, the count over the whole accumulation window)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
    return total / denominator, count


def chunked_causal_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch=None, chunk_tokens: int = 4096, softcap: float | None = None):
    """The same loss from the final hidden states and the LM head weight (vocab x hidden),
    `chunk_tokens` label positions at a time. Only positions with a label are computed."""
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != IGNORE_INDEX
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = shift_labels[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.shape[0], chunk_tokens):
        total = total + checkpoint(_chunk_loss, states[start:start + chunk_tokens], head_weight,
                                   targets[start:start + chunk_tokens], softcap, use_reentrant=False)
    count = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
    return total / denominator, count


def _chunk_loss(states, weight, targets, softcap):
    logits = F.linear(states, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")
