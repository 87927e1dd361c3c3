"""Validation: loss and perplexity per data source, and expert usage per source."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, label-token count) per row."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    losses = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = shift_labels != IGNORE_INDEX
    return (losses * mask).sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict, num_experts: int) -> dict:
    """{source: {loss, perplexity, tokens, gate_mean, dense_loss}} over the (sharded) eval
    loaders (accelerator=None: one process); gather_for_metrics drops the padding samples
    of the last uneven batch.

    `loss` routes as inference does; `dense_loss` routes the same batches with training's
    gates (noise off). They are one number unless gating is dense_train_top_k_eval, whose
    top-k inference is not the function that trained: a large gap says so."""
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: m)
    was_training = model.training
    model.eval()
    results = {}
    for source, loader in loaders.items():
        loss_sum, dense_sum, tokens, gate_sum, rows = 0.0, 0.0, 0, torch.zeros(num_experts, dtype=torch.float64), 0
        router = unwrap(model).router
        for batch in loader:
            batch = dict(batch)
            out = model(**batch)
            loss, count = per_example_loss(out.logits, batch["labels"])
            dense = loss
            if not router.infers_as_trained:
                router.train()  # training's gates, everything else still in eval mode (no dropout)
                dense, _ = per_example_loss(model(**batch).logits, batch["labels"])
                router.eval()
            gates = out.routing_weights.float().mean(dim=1)
            loss, dense, count, gates = gather((loss, dense, count, gates))
            loss_sum += loss.double().sum().item()
            dense_sum += dense.double().sum().item()
            tokens += int(count.sum().item())
            gate_sum += gates.double().sum(dim=0).cpu()
            rows += gates.shape[0]
        mean = loss_sum / max(tokens, 1)
        results[source] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens,
                           "dense_loss": dense_sum / max(tokens, 1),
                           "gate_mean": (gate_sum / max(rows, 1)).tolist()}
    model.train(was_training)
    return results
