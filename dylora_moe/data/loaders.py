"""Batches from a tokenized bundle: the training loader and one loader per source for
validation, used alike by training, `eval` and `prune`."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .collate import DataCollator, PackingCollator

COLUMNS = ["input_ids", "prompt_len", "source_id"]


def train_loader(dataset, pad_token_id: int, data_cfg, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Shuffled, with its own seeded generator: creating an iterator must not draw from
    the global RNG, or dropout masks shift after a resume. data.train_on_prompt decides
    the training labels."""
    collate = (PackingCollator(pad_token_id, data_cfg.max_seq_length, train_on_prompt=data_cfg.train_on_prompt)
               if data_cfg.packing else DataCollator(pad_token_id, train_on_prompt=data_cfg.train_on_prompt))
    # Workers live as long as one epoch's iterator, never beyond the run (train/loop.py
    # closes it on every way out); num_workers is bounded by the CPUs (train/preflight.py).
    return DataLoader(dataset.select_columns(COLUMNS), batch_size=batch_size, shuffle=True, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def eval_loaders(datasets: dict, pad_token_id: int, batch_size: int, seed: int = 0) -> dict[str, DataLoader]:
    """One loader per source. Evaluation scores the answers only, whatever the training
    objective, so losses stay comparable across recipes. Rows go shortest first: a loss
    summed over tokens does not depend on the order, and batches of similar lengths pad
    little (Code Alpaca + MBPP validation, batches of 8: 58-65% of the tokens are real in file
    order, 95% sorted)."""
    collate = DataCollator(pad_token_id)
    return {name: DataLoader(by_length(ds.select_columns(COLUMNS)), batch_size=batch_size, collate_fn=collate,
                             generator=torch.Generator().manual_seed(seed))
            for name, ds in datasets.items()}


def by_length(dataset):
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(lengths)), key=lengths.__getitem__))
