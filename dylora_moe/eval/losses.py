"""Validation loss and perplexity per source, and expert usage per source: training's
eval (train/loop.py), `dylora-moe eval` and `prune` all use these, in one forward per batch.

`loss` routes as inference does; `dense_loss` routes the same rows with training's gates.
They are the same number unless gating is dense_train_top_k_eval; then both come from one
forward over the batch stacked twice, whose router returns the top-k gates for the first
copy and the dense ones for the second, and one cross-entropy over the result.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..data import build_datasets
from ..data.loaders import eval_loaders
from ..model.loss import per_row_loss


@contextlib.contextmanager
def sparse_then_dense(router, rows: int):
    """Router outputs for a doubled batch: rows [:rows] sparse (eval), the rest dense (train)."""
    forward = router.forward

    def both(features):
        was_training = router.training
        try:
            router.train(False)
            sparse = forward(features[:rows])
            router.train(True)
            dense = forward(features[rows:])
        finally:
            router.train(was_training)
        return torch.cat([sparse, dense])

    router.forward = both
    try:
        yield
    finally:
        del router.forward  # the class's forward again


@torch.no_grad()
def batch_losses(model, router, batch: dict) -> dict:
    """Summed next-token loss per row (routed, and with training's gates), label-token
    counts and mean gates, for a model in eval mode (`model` may be the prepared wrapper)."""
    rows = batch["input_ids"].shape[0]
    copies = 1 if router.infers_as_trained else 2  # else one copy routed each way
    inputs = {k: torch.cat([v] * copies) for k, v in batch.items() if k in ("input_ids", "attention_mask", "prompt_mask")}
    labels = torch.cat([batch["labels"]] * copies)
    with sparse_then_dense(router, rows) if copies == 2 else contextlib.nullcontext():
        out = model(**inputs, labels=labels if "prompt_mask" not in batch else None)
    sums, tokens = per_row_loss(out.logits, labels)
    return {"loss": sums[:rows], "dense": sums[-rows:], "tokens": tokens[:rows],
            "gates": out.routing_weights[:rows].float().mean(dim=1)}


def evaluate_losses(model, loaders: dict, num_experts: int, accelerator=None) -> dict:
    """{source: {loss, perplexity, tokens, dense_loss, gate_mean}} over each source's
    loader. `loss` routes as inference does; `dense_loss` with training's gates (a large
    gap: inference is not the function that trained, see eval/health.py). With an
    accelerator the loaders are sharded and the sums gathered from every rank
    (gather_for_metrics drops the padding rows of an uneven last batch)."""
    gather = accelerator.gather_for_metrics if accelerator is not None else (lambda x: x)
    router = (accelerator.unwrap_model(model) if accelerator is not None else model).router
    was_training = model.training
    model.eval()
    results = {}
    try:
        for source, loader in loaders.items():
            loss, dense, tokens = 0.0, 0.0, 0
            gates, rows = torch.zeros(num_experts, dtype=torch.float64), 0
            for batch in loader:
                b = batch_losses(model, router, dict(batch))
                row_loss, row_dense, row_tokens, row_gates = gather((b["loss"], b["dense"], b["tokens"], b["gates"]))
                loss += row_loss.double().sum().item()
                dense += row_dense.double().sum().item()
                tokens += int(row_tokens.sum())
                gates += row_gates.double().sum(dim=0).cpu()
                rows += row_gates.shape[0]
            mean = loss / max(tokens, 1)
            results[source] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": tokens,
                               "dense_loss": dense / max(tokens, 1), "gate_mean": (gates / max(rows, 1)).tolist()}
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
