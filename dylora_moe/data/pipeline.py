"""DataConfig -> tokenized train stream (interleaved) and per-source eval splits.

    examples = load_examples(cfg)                  # read + validate + split: cheap, fails early
    bundle = build_datasets(cfg, tokenizer, examples)
    loader = DataLoader(bundle.train, collate_fn=DataCollator(pad_id), ...)
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from .config import DataConfig
from .sources import load_source
from .splits import subset
from .tokenize import tokenize_examples

logger = logging.getLogger(__name__)
EVAL_SPLITS = ("validation", "test")


@dataclass
class DataBundle:
    train: object                                   # datasets.Dataset of token rows, mixed across sources
    validation: dict = field(default_factory=dict)  # {source label: datasets.Dataset}
    test: dict = field(default_factory=dict)        # {source label: datasets.Dataset} (MBPP only)
    sources: list = field(default_factory=list)     # source labels; index = a row's source_id
    stats: dict = field(default_factory=dict)       # {label: {split: Counter(kept, truncated, dropped)}}


def load_examples(cfg: DataConfig) -> dict[str, dict[str, list[dict]]]:
    """{source label: {split: examples}}, subsets applied. Reads every file, so a missing
    file, an empty one or an unknown source fails here, before any model is loaded."""
    out = {}
    for source in cfg.sources:
        splits = load_source(source, cfg)
        out[source.label] = {
            name: subset(examples, cfg.training_subset if name == "train" else cfg.eval_subset, cfg.seed)
            for name, examples in splits.items()
        }
        logger.info("source %s: %s", source.label, {k: len(v) for k, v in out[source.label].items()})
    return out


def build_datasets(cfg: DataConfig, tokenizer, examples=None) -> DataBundle:
    from datasets import Dataset, concatenate_datasets, interleave_datasets

    examples = examples if examples is not None else load_examples(cfg)
    labels = [s.label for s in cfg.sources]
    bundle = DataBundle(train=None, sources=labels)
    train_sets = []
    for source_id, source in enumerate(cfg.sources):
        bundle.stats[source.label] = {}
        for split, rows in examples[source.label].items():
            tokens, counts = tokenize_examples(rows, tokenizer, source_id, cfg.max_seq_length, cfg.overlong)
            bundle.stats[source.label][split] = counts
            if counts["truncated"] or counts["dropped"]:
                logger.warning("%s/%s: %d example(s) over max_seq_length=%d: %d truncated, %d dropped",
                               source.label, split, counts["truncated"] + counts["dropped"], cfg.max_seq_length,
                               counts["truncated"], counts["dropped"])
            if not tokens:
                continue
            dataset = Dataset.from_list(tokens)
            if split == "train":
                train_sets.append((source.weight, dataset))
            else:
                getattr(bundle, split)[source.label] = dataset
    if not train_sets:
        raise ValueError("data: no training examples left after splitting, subsetting and max_seq_length")
    weights = [w for w, _ in train_sets]
    datasets = [d for _, d in train_sets]
    if len(datasets) == 1:
        bundle.train = datasets[0]
    elif cfg.interleaved_sampling:
        # Balanced draws: each row comes from source i with probability w_i / sum(w).
        probabilities = [w / sum(weights) for w in weights]
        bundle.train = interleave_datasets(datasets, probabilities=probabilities, seed=cfg.seed,
                                           stopping_strategy=cfg.stopping_strategy)
    else:
        bundle.train = concatenate_datasets(datasets).shuffle(seed=cfg.seed)
    logger.info("train rows: %d (%s)", len(bundle.train), dict(Counter(bundle.train["source_id"])))
    return bundle
