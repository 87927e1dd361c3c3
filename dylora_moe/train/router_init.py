"""Router initialisation from the data (moe.router_init: kmeans), before the first step.

A fresh mixture has every B = 0, so at first all experts are the base model and the
router's only signal is the balance loss: which expert ends up with which data is decided
by noise, and experts can die before they differ. Clustering the routing features of the
training data first (as HydraLoRA clusters its training data) and pointing each expert's
router row at one cluster gives every expert its own share of the data from step one.

The sample is the first rows of the training stream, the same on every rank; rank 0's
result is broadcast so every rank starts from the same router (and a run on N processes
starts where a run on one does).
"""
from __future__ import annotations

import hashlib
import logging

import torch
from accelerate.utils import broadcast
from torch.utils.data import DataLoader

from ..data import DataCollator
from ..model.kmeans import rows_from_clusters
from ..model.routing import training_unit_features
from . import sharding

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 1024     # training rows whose prompts are clustered
MAX_UNITS = 8192       # token routing: units kept (seeded subsample) for k-means


@torch.no_grad()
def init_router_from_data(moe, dataset, tokenizer, cfg, accelerator) -> list[int]:
    """Cluster the routing features of the first SAMPLE_ROWS training rows and initialise
    the router from the clusters (model/kmeans.py). Returns the cluster sizes.

    Called before accelerator.prepare, so that the optimizer's master copy starts from
    these rows, except under ZeRO-3: there the base is only this rank's partitions until
    DeepSpeed's hooks gather each layer for its forward, so the pass runs after prepare
    and the rows are written into the module and the master copy (sharding.write_full)."""
    gate = moe.router.gate.weight
    if not sharding.is_partitioned(gate):
        moe.to(accelerator.device)
    features = _training_features(moe, dataset, tokenizer, cfg, accelerator)
    weight, center, sizes = rows_from_clusters(features, moe.router.num_experts, cfg.moe.router_init_scale,
                                               cfg.train.seed)
    if accelerator.num_processes > 1:  # every rank starts from rank 0's router
        weight, center = (broadcast(t.contiguous(), from_process=0) for t in (weight, center))
    moe.router.feature_center.copy_(center)
    if sharding.is_partitioned(gate):
        sharding.write_full(gate, weight)
    else:
        gate.copy_(weight)
    digest = router_sha256(moe.router)
    if accelerator.is_main_process:
        logger.info("router initialised from k-means of %d routing units of the training data: cluster sizes %s "
                    "(router sha256 %s)", features.shape[0], sizes.tolist(), digest[:16])
    return sizes.tolist()


def _training_features(moe, dataset, tokenizer, cfg, accelerator) -> torch.Tensor:
    rows = dataset.select(range(min(len(dataset), SAMPLE_ROWS)))
    rows = rows.select_columns(["input_ids", "prompt_len", "source_id"])
    loader = DataLoader(rows, batch_size=cfg.train.eval_batch_size, collate_fn=DataCollator(tokenizer.pad_token_id))
    was_training = moe.training
    moe.eval()  # no dropout; the routing features do not depend on the experts
    try:
        with accelerator.autocast():  # as training computes them
            features = [training_unit_features(moe, b["input_ids"].to(accelerator.device),
                                               b["attention_mask"].to(accelerator.device),
                                               b["labels"].to(accelerator.device)).float() for b in loader]
    finally:
        moe.train(was_training)
    features = torch.cat(features)
    if features.shape[0] > MAX_UNITS:
        keep = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(cfg.train.seed))[:MAX_UNITS]
        features = features[keep.to(features.device)]
    return features


def router_sha256(router) -> str:
    """Of the router's rows and feature centre (a collective under a sharded base)."""
    digest = hashlib.sha256()
    for tensor in (sharding.full_value(router.gate.weight), router.feature_center):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
