"""DataConfig -> tokenized train stream (interleaved) and per-source eval splits.

    examples = load_examples(cfg)                  # read + validate + split: cheap, fails early
    bundle = build_datasets(cfg, tokenizer, examples)
    loader = DataLoader(bundle.train, collate_fn=DataCollator(pad_id), ...)
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from datasets import Dataset, concatenate_datasets, interleave_datasets

from ..errors import UserError
from .config import DataConfig
from .sources import load_source
from .splits import subset
from .tokenize import tokenize_examples

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: object                                   # datasets.Dataset of token rows, mixed across sources
    validation: dict = field(default_factory=dict)  # {source label: datasets.Dataset}
    test: dict = field(default_factory=dict)        # {source label: datasets.Dataset} (MBPP only)
    sources: list = field(default_factory=list)     # source labels; index = a row's source_id
    stats: dict = field(default_factory=dict)       # {label: {split: Counter(kept, truncated, dropped)}}


class Examples(dict):
    """{source label: {split: examples}}, plus what each source's rows went through
    (`loaded`: sources.Loaded) to say why a split came out empty."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loaded = {}


def load_examples(cfg: DataConfig) -> Examples:
    """{source label: {split: examples}}, subsets applied. Reads every file, so a missing
    file, an empty one, an unknown source or one with nothing left to train on fails
    here, before any model is loaded."""
    out = Examples()
    for source in cfg.sources:
        loaded = load_source(source, cfg)
        out.loaded[source.label] = loaded
        out[source.label] = {
            name: subset(examples, cfg.training_subset if name == "train" else cfg.eval_subset, cfg.seed)
            for name, examples in loaded.splits.items()
        }
        logger.info("source %s: %s", source.label, {k: len(v) for k, v in out[source.label].items()})
    empty = [label for label, splits in out.items() if not splits.get("train")]
    if len(empty) == len(out):
        raise UserError("data: no training examples left: " + "; ".join(why_no_train(out, label) for label in empty))
    for label in empty:
        logger.warning("data: source %s has no training examples (%s): it is only evaluated", label,
                       why_no_train(out, label))
    return out


def why_no_train(examples: dict, label: str) -> str:
    """What happened to a source's rows on the way to an empty train split."""
    loaded = getattr(examples, "loaded", {}).get(label)
    sizes = ", ".join(f"{len(v)} {k}" for k, v in examples[label].items())
    if loaded is None:
        return f"{label}: {sizes}"
    kept = loaded.rows - loaded.duplicates
    duplicates = f", {loaded.duplicates} exact duplicate prompt(s) removed" if loaded.duplicates else ""
    return (f"{label} ({loaded.origin}): {loaded.rows} usable row(s){duplicates}, {kept} distinct example(s) split "
            f"{loaded.split_rule} into {sizes}")


def why_dropped(cfg: DataConfig, counts) -> str:
    return (f"all {counts['dropped']} train example(s) are longer than data.max_seq_length={cfg.max_seq_length} "
            f"(data.overlong={cfg.overlong!r}; an example whose prompt alone is that long is dropped either way)")


def build_datasets(cfg: DataConfig, tokenizer, examples=None) -> DataBundle:
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
    dropped = {label: why_dropped(cfg, stats["train"]) for label, stats in bundle.stats.items()
               if "train" in stats and stats["train"]["dropped"] and not stats["train"]["kept"]}
    if not train_sets:
        reasons = "; ".join(f"{label}: {why}" for label, why in dropped.items()) or "every train split is empty"
        raise UserError(f"data: no training examples left after tokenizing: {reasons}")
    for label, why in dropped.items():
        logger.warning("data: source %s has no training examples left: %s", label, why)
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
