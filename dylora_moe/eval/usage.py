"""Expert usage: each expert's mean gate over a run's validation examples, routed as
inference routes. `prune` drops the experts under a threshold by it; `export` folds the
mixture at it."""
from __future__ import annotations

import torch

from ..data import build_datasets, load_examples
from ..data.loaders import eval_loaders
from ..errors import UserError
from .losses import evaluate_losses


def expert_usage(moe, recipe, tokenizer) -> tuple[list[float], dict[str, list[float]]]:
    """(usage per expert over all validation examples, usage per source)."""
    bundle = build_datasets(recipe.data, tokenizer, load_examples(recipe.data))
    loaders = eval_loaders(bundle.validation, tokenizer.pad_token_id, recipe.train.eval_batch_size, recipe.train.seed)
    if not loaders:
        raise UserError("the run's recipe has no validation data to measure expert usage on")
    results = evaluate_losses(moe, loaders, moe.config.num_experts)
    rows = {name: len(bundle.validation[name]) for name in results}
    total = torch.zeros(moe.config.num_experts, dtype=torch.float64)
    for name, result in results.items():
        total += torch.tensor(result["gate_mean"], dtype=torch.float64) * rows[name]
    return (total / sum(rows.values())).tolist(), {name: r["gate_mean"] for name, r in results.items()}
