"""Token rows -> padded tensors: input_ids, attention_mask, labels, prompt_mask, source_id."""
from __future__ import annotations

import torch

from ..model.loss import IGNORE_INDEX  # one definition of the ignored label


class DataCollator:
    """Right-pads a list of token rows into a batch.

    labels: -100 on padding and (unless train_on_prompt) on the prompt; the answer and its
    EOS keep their ids. prompt_mask: True on prompt tokens, which sequence routing pools.
    """

    def __init__(self, pad_token_id: int, train_on_prompt: bool = False):
        self.pad_token_id, self.train_on_prompt = pad_token_id, train_on_prompt

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        prompt_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            length, prompt_len = len(ids), row["prompt_len"]
            input_ids[i, :length] = ids
            attention_mask[i, :length] = 1
            prompt_mask[i, :prompt_len] = True
            first_label = 0 if self.train_on_prompt else prompt_len
            labels[i, first_label:length] = ids[first_label:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prompt_mask": prompt_mask, "source_id": torch.tensor([r["source_id"] for r in rows])}


class PackingCollator:
    """Packs a batch's rows, in order, into as few rows of at most `max_seq_length` tokens
    as fit. Each packed example keeps its own positions (restarting at 0), its segment
    number (segment_ids, -1 on padding) and its source; the model attends and routes
    within each example only. The label of each example's first token is -100: it
    would otherwise be predicted from the previous example.
    """

    def __init__(self, pad_token_id: int, max_seq_length: int, train_on_prompt: bool = False):
        self.pad_token_id, self.max_seq_length, self.train_on_prompt = pad_token_id, max_seq_length, train_on_prompt

    def bins(self, rows: list[dict]) -> list[list[dict]]:
        bins, current, used = [], [], 0
        for row in rows:
            length = len(row["input_ids"])
            if current and used + length > self.max_seq_length:
                bins.append(current)
                current, used = [], 0
            current.append(row)
            used += length
        return bins + [current] if current else bins

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        bins = self.bins(rows)
        width = max(sum(len(r["input_ids"]) for r in b) for b in bins)
        n, segments = len(bins), max(len(b) for b in bins)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        prompt_mask = torch.zeros((n, width), dtype=torch.bool)
        segment_ids = torch.full((n, width), -1, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        source_id = torch.full((n, segments), -1, dtype=torch.long)
        for i, packed in enumerate(bins):
            start = 0
            for s, row in enumerate(packed):
                ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
                end, prompt_end = start + len(ids), start + row["prompt_len"]
                input_ids[i, start:end] = ids
                attention_mask[i, start:end] = 1
                prompt_mask[i, start:prompt_end] = True
                segment_ids[i, start:end] = s
                position_ids[i, start:end] = torch.arange(len(ids))
                first_label = start + 1 if self.train_on_prompt else prompt_end
                labels[i, first_label:end] = ids[first_label - start:]
                source_id[i, s] = row["source_id"]
                start = end
            # padding counts as one more sequence of its own, positions restarting at 0
            position_ids[i, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "prompt_mask": prompt_mask, "segment_ids": segment_ids, "position_ids": position_ids,
                "source_id": source_id}
