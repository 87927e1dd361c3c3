"""Next-token cross-entropy, plain or chunked.

CodeGemma's 256,000-token vocabulary makes the logits the largest tensor of a step
(batch 4 x 1024: 1 GiB in bf16, 2 GiB more in fp32 for the loss, and the same again for
the gradient). The chunked loss never builds them whole: it runs the LM head on about a
thousand tokens at a time and computes each chunk's gradient right there, in the
forward (LinearCrossEntropy), so the backward has no logits to rebuild. Same loss and
gradients as the plain one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Logits per chunk when the size is automatic: 2**28 logits are ~1.5 GiB in flight (their
# fp32 copy, then the bf16 gradient beside it). At CodeGemma's 256k vocabulary that is ~1k
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


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token cross-entropy summed over each row's label tokens, their count per row):
    validation adds these up across batches and ranks before dividing."""
    shift_labels = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), shift_labels, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)


def chunked_causal_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch=None, chunk_tokens: int = 4096, softcap: float | None = None,
                           chunk_fn=None):
    """The same loss from the final hidden states and the LM head weight (vocab x hidden),
    `chunk_tokens` label positions at a time. Only positions with a label are computed.
    `chunk_fn`: how each chunk's loss and logit gradient are computed (default
    `chunk_loss_in_place`; `compiled_chunk_loss()` under model.compile)."""
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != IGNORE_INDEX
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = shift_labels[keep]
    grads = torch.is_grad_enabled()
    total = LinearCrossEntropy.apply(states, head_weight, targets, chunk_tokens, softcap,
                                     grads and states.requires_grad, grads and head_weight.requires_grad,
                                     chunk_fn or chunk_loss_in_place)
    count = keep.sum()
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp_min(1)
    return total / denominator, count


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(states_i @ weight.T, target_i), one chunk of rows at a time,
    with the gradients computed in the forward while each chunk's logits are at hand.

    Why not autograd with each chunk checkpointed: the
    backward then recomputes every chunk's logits, a third LM-head matmul (about a tenth
    of a CodeGemma-2B step's FLOPs at 1k tokens per row), and walks the fp32 logits
    several more times. Here each chunk costs two matmuls (logits, then the gradient of
    the states) and one softmax; the backward only scales the stored gradients by the
    incoming one. Matmuls run in the dtype autocast gives them, like the plain path, so
    the two agree to rounding.
    """

    @staticmethod
    def forward(ctx, states, weight, targets, chunk_tokens, softcap, need_states, need_weight, chunk_fn):
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grad_states = torch.empty_like(states) if need_states else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, targets.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            x = states[rows]
            loss, g = chunk_fn(F.linear(x, weight), targets[rows], softcap, need_states or need_weight)
            total += loss
            if need_states:
                grad_states[rows] = torch.mm(g, weight.to(g.dtype)).to(states.dtype)
            if need_weight:
                grad_weight += torch.mm(g.t(), x.to(g.dtype)).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_states, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_states, grad_weight = ctx.saved_tensors
        if grad_states is not None:
            grad_states = grad_states * grad_total.to(grad_states.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_states, grad_weight, None, None, None, None, None, None


def chunk_loss_in_place(logits, targets, softcap, need_grad):
    """(summed cross-entropy in fp32, d loss / d logits in the logits' dtype or None) for
    one chunk, consuming `logits`: everything is done in place in one fp32 copy, since
    torch.logsumexp would allocate a second chunk-sized tensor (it doubled the loss's peak)."""
    dtype = logits.dtype
    z = logits.float()
    del logits
    if softcap:
        squashed = torch.tanh(z / softcap)
        z = squashed * softcap
    picked = z.gather(1, targets[:, None]).squeeze(1)
    top = z.amax(dim=-1, keepdim=True)
    sums = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
    loss = (top + sums.log()).squeeze(1).sub(picked).sum()
    if not need_grad:
        return loss, None
    g = z.div_(sums)  # softmax ...
    g[torch.arange(targets.shape[0], device=targets.device), targets] -= 1  # ... - one_hot(target)
    if softcap:  # through softcap * tanh(logits / softcap)
        g.mul_(1 - squashed * squashed)
    return loss, g.to(dtype)


def chunk_loss_functional(logits, targets, softcap, need_grad):
    """chunk_loss_in_place's maths without mutation, for torch.compile: inductor fuses it
    into a row reduction and one elementwise pass that reads the logits and writes the
    gradient, instead of the seven full passes over fp32 logits the eager version makes."""
    z = logits.float()
    if softcap:
        squashed = torch.tanh(z / softcap)
        z = squashed * softcap
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = (lse.squeeze(1) - z.gather(1, targets[:, None]).squeeze(1)).sum()
    if not need_grad:
        return loss, None
    columns = torch.arange(z.shape[1], device=z.device)
    g = torch.exp(z - lse) - (columns[None, :] == targets[:, None]).to(z.dtype)
    if softcap:
        g = g * (1 - squashed * squashed)
    return loss, g.to(logits.dtype)


def compiled_chunk_loss(**compile_kwargs):
    """chunk_loss_functional under torch.compile (dynamic: the last chunk is shorter)."""
    compile_kwargs.setdefault("dynamic", True)
    return torch.compile(chunk_loss_functional, **compile_kwargs)
