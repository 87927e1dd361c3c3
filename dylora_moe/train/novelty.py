"""The novelty trigger: add an expert when a data source looks like nothing the
experts have trained on (`train.grow_on_novelty`).

The library: per expert, the mean embedding of the examples it trained on (router
buffers `expert_centroids` / `centroid_counts`). It is saved with the model and in
checkpoints, so a later run (say, a resume on new data) starts from what earlier runs
learnt. It is kept up to date only while growth is on: with grow_on_novelty off nothing
here runs (no embeddings, no all-reduce). A novelty run resumed from one trained
without it starts from an empty library, so its first data is taken as familiar (a
warning says so); train the earlier phase with grow_on_novelty on (max_experts =
num_experts: it never grows) to keep its library.

An example's embedding is the base model's input embeddings, layer-normed as the router
does, averaged over the example's answer (its label tokens): an embedding lookup, no
extra forward pass. Why the answer and not the prompt: every prompt shares the
instruction template, which dominates a prompt mean. Measured on the demo data with the
tiny base: two different task families have cosine 0.86 between prompt means and 0.59
between answer means; the same family 0.98 either way.

Each optimizer step, for each data source (summed over micro-batches and ranks, so every
rank decides the same):
- similarity = the highest cosine between the mean embedding of the source's examples
  this step and any expert's centroid;
- familiar (>= novelty_threshold, or an empty library): the examples update the centroid
  of their top-1 expert, if it trained this step (a frozen expert's centroid stays what
  it specialised in);
- novel: they update only immature experts' centroids (a new expert taking the data on:
  once it has, the data is familiar), never a mature expert's, and the source's novel
  streak grows. After `novelty_window` novel steps in a row, with
  grow_on_novelty and fewer than max_experts experts, the loop adds an expert whose
  centroid starts as the mean of the streak's examples, so it is not novel again.
The streaks are part of TrainState: an exact resume continues them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..data.collate import IGNORE_INDEX
from ..model.pooling import masked_mean, segment_mean

logger = logging.getLogger(__name__)


@dataclass
class GrowthRequest:
    source: str
    similarity: float
    nearest: int              # the expert whose centroid came closest
    steps: int                # novel steps in a row
    centroid: torch.Tensor    # (hidden,) mean embedding of the streak's examples
    count: int                # examples in the streak

    def reason(self, threshold: float) -> str:
        return (f"data source {self.source!r} stayed below novelty_threshold={threshold} for {self.steps} steps "
                f"(similarity {self.similarity:.3f} to the nearest expert, {self.nearest})")


@torch.no_grad()
def answer_embeddings(moe, batch: dict, gates: torch.Tensor):
    """(features (U, hidden) fp32, source (U,), top-1 expert (U,)) for every example of a
    micro-batch that has answer tokens; U = rows, or packed segments."""
    features, source, top1, has_answer = example_embeddings(moe, batch, gates)
    return features[has_answer], source[has_answer], top1[has_answer]


@torch.no_grad()
def example_embeddings(moe, batch: dict, gates: torch.Tensor):
    """(features (N, hidden) fp32, source (N,), top-1 expert (N,), has answer (N,) bool)
    for every row, or every packed segment slot, of a micro-batch: masks instead of a
    selection, which would read its size back to the host."""
    ids, labels = batch["input_ids"], batch["labels"]
    embeddings = moe.base_model.get_input_embeddings()(ids).float()
    embeddings = F.layer_norm(embeddings, embeddings.shape[-1:])
    answer = labels != IGNORE_INDEX
    source = batch.get("source_id")
    segments = batch.get("segment_ids")
    if segments is None:
        features = masked_mean(embeddings, answer).squeeze(1)
        unit_gates = gates.float()[:, 0]
        if gates.shape[1] > 1:  # token routing: average each row's attended tokens (padding is routed too)
            unit_gates = masked_mean(gates.float(), batch["attention_mask"]).squeeze(1)
        has_answer = answer.any(dim=1)
        source = source if source is not None else torch.zeros_like(has_answer, dtype=torch.long)
    else:  # packed rows: one unit per example (segment)
        count = source.shape[1]
        features = segment_mean(embeddings, answer, segments, count)
        if gates.shape[1] != count:  # token routing: average each example's tokens (not padding: -1)
            gates = segment_mean(gates.float(), torch.ones_like(answer), segments, count)
        unit_gates = gates.float()
        has_answer = segment_mean(answer.float().unsqueeze(-1), answer, segments, count).squeeze(-1) > 0
        has_answer &= source >= 0
    hidden = features.shape[-1]
    return (features.reshape(-1, hidden), source.reshape(-1), unit_gates.argmax(dim=-1).reshape(-1),
            has_answer.reshape(-1))


class NoveltyMonitor:
    def __init__(self, sources: list[str], threshold: float, window: int, max_experts: int, enabled: bool,
                 state: dict):
        self.sources, self.threshold, self.window = list(sources), threshold, window
        self.max_experts, self.enabled = max_experts, enabled
        self.state = state  # TrainState.novelty: {"streak": {}, "sum": {}, "count": {}} per source label
        for key in ("streak", "sum", "count"):
            self.state.setdefault(key, {})
        self.last_similarity: dict[str, Optional[float]] = {}
        self._sums = self._counts = None
        self._warned = False

    def add(self, moe, batch: dict, gates: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """One micro-batch's examples, by (source, top-1 expert), on the device. `keep`: a
        bool, False for a micro-batch whose loss was not finite (it adds nothing)."""
        features, source, top1, has_answer = example_embeddings(moe, batch, gates)
        if keep is not None:
            has_answer = has_answer & keep
        weight = has_answer.double()
        sums, counts = self._buffers(moe, features.device)
        cell = source.clamp_min(0) * moe.config.num_experts + top1
        sums.view(-1, sums.shape[-1]).index_add_(0, cell, features.double() * weight.unsqueeze(1))
        counts.view(-1).index_add_(0, cell, weight)

    def end_step(self, accelerator, moe, trained: torch.Tensor) -> Optional[GrowthRequest]:
        """After an optimizer step (every rank): update the library, return a request to
        grow, if any. A collective: every rank must call it."""
        device = accelerator.device if accelerator is not None else torch.device("cpu")
        sums, counts = self._buffers(moe, device)
        if accelerator is not None and accelerator.num_processes > 1:
            flat = accelerator.reduce(torch.cat([sums.flatten(), counts.flatten()]), reduction="sum")
            sums, counts = flat[:sums.numel()].view_as(sums), flat[sums.numel():].view_as(counts)
        self._sums = self._counts = None
        request = None
        self.last_similarity = {}
        for s, label in enumerate(self.sources):
            if counts[s].sum() > 0:
                request = self._observe(moe, label, sums[s], counts[s], trained) or request
        return request

    def seed(self, moe, index: int, request: GrowthRequest) -> None:
        """A new expert's library entry: the data whose novelty made it."""
        with torch.no_grad():
            moe.router.expert_centroids[index] = request.centroid.to(moe.router.expert_centroids)
            moe.router.centroid_counts[index] = request.count
        self._reset(request.source)

    def _observe(self, moe, label, sums, counts, trained) -> Optional[GrowthRequest]:
        """sums (E, hidden), counts (E,): this step's examples of one source by top-1 expert."""
        router = moe.router
        total = sums.sum(dim=0) / counts.sum()
        known = router.centroid_counts > 0
        if not bool(known.any()):  # an empty library: whatever trains first is familiar
            self._warn_empty(router)
            self._learn(router, sums, counts, trained)
            return None
        immature = ~router.expert_maturity.to(trained.device)
        similarity = F.cosine_similarity(total.unsqueeze(0), router.expert_centroids.double()[known], dim=-1)
        best = float(similarity.max())
        nearest = int(known.nonzero().flatten()[similarity.argmax()])
        self.last_similarity[label] = best
        if best >= self.threshold:
            self._learn(router, sums, counts, trained)
            self._reset(label)
            return None
        self._learn(router, sums, counts, trained & immature)
        streak = self.state["streak"].get(label, 0) + 1
        self.state["streak"][label] = streak
        self.state["sum"][label] = self.state["sum"].get(label, 0) + sums.sum(dim=0).cpu()
        self.state["count"][label] = self.state["count"].get(label, 0) + int(counts.sum())
        if streak < self.window:
            return None
        if not self.enabled:
            return None
        request = GrowthRequest(label, best, nearest, streak,
                                self.state["sum"][label] / self.state["count"][label], self.state["count"][label])
        if moe.config.num_experts >= self.max_experts:
            logger.warning("novelty: %s; not adding an expert: already %d (train.max_experts)",
                           request.reason(self.threshold), moe.config.num_experts)
            self._reset(label)
            return None
        return request

    @staticmethod
    @torch.no_grad()
    def _learn(router, sums, counts, trained) -> None:
        """Running means: centroid_e <- (centroid_e * n_e + sum) / (n_e + k), for experts that trained."""
        update = (counts > 0) & trained.to(counts.device)
        if not bool(update.any()):
            return
        old_n = router.centroid_counts.double()
        new_n = old_n + counts.double() * update
        merged = (router.expert_centroids.double() * old_n.unsqueeze(1) + sums * update.unsqueeze(1))
        merged = merged / new_n.clamp_min(1).unsqueeze(1)
        router.expert_centroids.copy_(torch.where(update.unsqueeze(1), merged, router.expert_centroids.double()))
        router.centroid_counts.copy_(new_n.long())

    def _warn_empty(self, router) -> None:
        trained_before = int(router.expert_steps.max()) if router.expert_steps.numel() else 0
        if trained_before and not self._warned:
            logger.warning("novelty: the experts trained %d steps but their library is empty (they were trained "
                           "without train.grow_on_novelty, which keeps it): this step's data is taken as familiar, "
                           "and only data unlike it counts as novel", trained_before)
        self._warned = True

    def _reset(self, label: str) -> None:
        for key in ("streak", "sum", "count"):
            self.state[key].pop(label, None)

    def _buffers(self, moe, device):
        if self._sums is None:
            shape = (len(self.sources), moe.config.num_experts)
            self._sums = torch.zeros(*shape, moe.router.expert_centroids.shape[1], dtype=torch.float64, device=device)
            self._counts = torch.zeros(shape, dtype=torch.float64, device=device)
        return self._sums, self._counts
