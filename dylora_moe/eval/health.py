"""Warnings about a mixture's routing, from validation results: experts nobody routes
to. Training's eval log, `dylora-moe eval` and `dylora-moe report` all print them."""
from __future__ import annotations

DEAD_SHARE = 0.01  # an expert under this share of routing does nothing for its parameters


def routing_warnings(results: dict) -> list[str]:
    """results: {source: {"loss", "gate_mean"}} (validation, as evaluate()
    returns) -> one line per problem found, with the numbers."""
    if not results:
        return []
    usage = [sum(shares) / len(results) for shares in zip(*(r["gate_mean"] for r in results.values()))]
    warnings = []
    dead = [i for i, share in enumerate(usage) if share < DEAD_SHARE]
    if dead and len(usage) > 1:
        warnings.append(f"expert(s) {dead} take under {DEAD_SHARE:.0%} of routing on the validation data (usage "
                        f"{[round(u, 3) for u in usage]}): their parameters do nothing; `dylora-moe prune` drops "
                        "them, and moe.balance_coefficient > 0 keeps experts alive in training")
    return warnings
