"""Validation loss and perplexity per source, and expert usage per source: training's
eval (train/loop.py), `dylora-moe eval` and `prune` all use these, in one forward per
batch, routed as inference routes (every gating infers as it trains).
"""
from __future__ import annotations

import math

import torch

from ..data import build_datasets
from ..data.loaders import eval_loaders
from ..model.loss import per_row_loss


@torch.no_grad()
def batch_losses(model, batch: dict) -> dict:
    """Summed next-token loss per row, label-token counts and mean gates, for a model in
    eval mode (`model` may be the prepared wrapper)."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "prompt_mask")}
    labels = batch["labels"]
    out = model(**inputs, labels=labels if "prompt_mask" not in batch else None)
    sums, tokens = per_row_loss(out.logits, labels)
    return {"loss": sums, "tokens": tokens, "gates": out.routing_weights.float().mean(dim=1)}


def evaluate_losses(model, loaders: dict, num_experts: int, accelerator=None) -> dict:
    """{source: {loss, perplexity, tokens, gate_mean}} over each source's loader. With an
    accelerator the loaders are sharded and the sums gathered from every rank
    (gather_for_metrics drops the padding rows of an uneven last batch)."""
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    was_training = model.training
    model.eval()
    results = {}
    try:
        for source, loader in loaders.items():
            loss, tokens = 0.0, 0
            gates, rows = torch.zeros(num_experts, dtype=torch.float64), 0
            for batch in loader:
                b = batch_losses(model, dict(batch))
                row_loss, row_tokens, row_gates = gather((b["loss"], b["tokens"], b["gates"]))
                loss += row_loss.double().sum().item()
                tokens += int(row_tokens.sum())
                gates += row_gates.double().sum(dim=0).cpu()
                rows += row_gates.shape[0]
            mean = loss / max(tokens, 1)
            results[source] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens,
                               "gate_mean": (gates / max(rows, 1)).tolist()}
    finally:
        model.train(was_training)
    return results


def source_losses(loaded, recipe, batch_size: int = 8) -> dict:
    """Loss / perplexity per source on the validation and test splits of the run's data."""
    bundle = build_datasets(recipe.data, loaded.tokenizer)
    out = {}
    for split in ("validation", "test"):
        loaders = eval_loaders(getattr(bundle, split), loaded.tokenizer.pad_token_id, batch_size)
        for name, r in evaluate_losses(loaded.moe, loaders, loaded.moe.config.num_experts).items():
            out[f"{name}/{split}"] = r
    return out
