"""Warnings about a mixture's routing, from validation results: experts nobody routes to,
and inference that routes differently from training. Training's eval log, `dylora-moe
eval` and `dylora-moe report` all print them."""
from __future__ import annotations

DEAD_SHARE = 0.01  # an expert under this share of routing does nothing for its parameters
GAP = 0.10         # routed loss more than this much above the training mixture's


def routing_warnings(results: dict) -> list[str]:
    """results: {source: {"loss", "dense_loss", "gate_mean"}} (validation, as evaluate()
    returns) -> one line per problem found, with the numbers."""
    if not results:
        return []
    usage = [sum(shares) / len(results) for shares in zip(*(r["gate_mean"] for r in results.values()))]
    warnings = []
    dead = [i for i, share in enumerate(usage) if share < DEAD_SHARE]
    if dead and len(usage) > 1:
        warnings.append(f"expert(s) {dead} take under {DEAD_SHARE:.0%} of routing on the validation data (usage "
                        f"{[round(u, 3) for u in usage]}): their parameters do nothing; `dylora-moe prune` drops "
                        "them, and moe.balance_loss: switch keeps experts alive in training")
    for source, r in results.items():
        dense = r.get("dense_loss", r["loss"])
        if dense > 0 and r["loss"] > (1 + GAP) * dense:
            warnings.append(f"{source}: the routed loss {r['loss']:.4f} is {r['loss'] / dense:.2f}x the training "
                            f"mixture's {dense:.4f}: inference routes differently from training; train with "
                            "moe.gating: dense (or top_k / straight_through), which infer as they train")
    return warnings
