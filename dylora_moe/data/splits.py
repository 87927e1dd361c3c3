"""Seeded, machine-independent splits with exact duplicates removed first.

Each example's place is decided by sha256(seed, prompt), not by a shuffled index, so a
split does not depend on file order, Python's hash seed or the platform, and adding rows
to a source leaves the other rows where they were.
"""
from __future__ import annotations

import hashlib
import logging
import math

logger = logging.getLogger(__name__)


def dedupe(examples: list[dict], where: str) -> list[dict]:
    """Drop later examples whose prompt was already seen (so no prompt can land in two splits)."""
    seen, kept = set(), []
    for ex in examples:
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            kept.append(ex)
    if len(kept) < len(examples):
        logger.info("%s: removed %d exact duplicate prompt(s)", where, len(examples) - len(kept))
    return kept


def _key(seed: int, prompt: str) -> str:
    return hashlib.sha256(f"{seed}\x00{prompt}".encode("utf-8", errors="surrogatepass")).hexdigest()


def hash_order(examples: list[dict], seed: int) -> list[dict]:
    return sorted(examples, key=lambda ex: _key(seed, ex["prompt"]))


def fraction_split(examples: list[dict], fractions: dict[str, float], seed: int) -> dict[str, list[dict]]:
    """{"train": 0.9, "validation": 0.1} -> the deduplicated examples cut in that order;
    every split but the last gets floor(n * fraction), the last the rest."""
    ordered = hash_order(examples, seed)
    out, start = {}, 0
    names = list(fractions)
    for i, name in enumerate(names):
        end = len(ordered) if i == len(names) - 1 else start + math.floor(len(ordered) * fractions[name])
        out[name] = ordered[start:end]
        start = end
    return out


def subset(examples: list[dict], percent: float, seed: int) -> list[dict]:
    """The first `percent`% (at least one) of a seeded order: the same rows every run."""
    if percent >= 100:
        return examples
    keep = max(1, math.ceil(len(examples) * percent / 100))
    chosen = {id(ex) for ex in hash_order(examples, seed + 1)[:keep]}
    return [ex for ex in examples if id(ex) in chosen]
