"""Validation loss per source (eval/losses.py, used by training's eval, `eval` and `prune`):
the numbers a plain forward gives, from one forward per batch."""
import math

import pytest
import torch
from conftest import VOCAB, make_moe, randomize_experts

from dylora_moe.data import DataCollator
from dylora_moe.eval.losses import evaluate_losses
import torch.nn.functional as F


def evaluate(accelerator, moe, loaders, num_experts):
    """The reference: per batch, one plain forward and its own cross-entropy."""
    assert accelerator is None
    moe.eval()
    out = {}
    with torch.no_grad():
        for source, batches in loaders.items():
            loss = tokens = rows = 0.0
            gates = torch.zeros(num_experts, dtype=torch.float64)
            for batch in batches:
                labels = batch["labels"][:, 1:]
                mask = labels != -100
                routed = moe(**batch)
                ce = F.cross_entropy(routed.logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100,
                                     reduction="none")
                loss += float((ce * mask).sum())
                tokens += int(mask.sum())
                gates += routed.routing_weights.double().mean(dim=1).sum(dim=0)
                rows += batch["input_ids"].shape[0]
            out[source] = {"loss": loss / tokens, "tokens": tokens,
                           "perplexity": math.exp(loss / tokens), "gate_mean": (gates / rows).tolist()}
    return out


def counting_base_passes(moe, *runs):
    """Each run's result with the number of base forward passes it made."""
    calls, out = [], []
    hook = moe.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for run in runs:
            calls.clear()
            out.append((run(), len(calls)))
    finally:
        hook.remove()
    return out


def loader(seed=0, rows=10, batch_size=4):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        length = int(torch.randint(6, 20, (1,), generator=g))
        examples.append({"input_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist(),
                         "prompt_len": length // 2, "source_id": 0})
    collate = DataCollator(0)
    return [collate(examples[i:i + batch_size]) for i in range(0, rows, batch_size)]


@pytest.mark.parametrize("routing", ["sequence", "token"])
@pytest.mark.parametrize("gating", ["dense", "top_k", "straight_through"])
def test_one_forward_per_batch_gives_the_plain_loss(gating, routing):
    moe = make_moe("llama", num_experts=4, top_k=1, gating=gating, routing=routing, temperature=0.3)
    randomize_experts(moe, scale=1.0)
    loaders = {"a": loader(0), "b": loader(1)}
    (ours, ours_calls), (theirs, their_calls) = counting_base_passes(moe, lambda: evaluate_losses(moe, loaders, 4),
                                                                     lambda: evaluate(None, moe, loaders, 4))
    for source in loaders:
        for key in ("loss", "perplexity"):
            assert ours[source][key] == pytest.approx(theirs[source][key], rel=1e-6), (source, key)
        assert ours[source]["tokens"] == theirs[source]["tokens"]
        assert ours[source]["gate_mean"] == pytest.approx(theirs[source]["gate_mean"], abs=1e-6)
        assert set(ours[source]) == {"loss", "perplexity", "tokens", "gate_mean"}
    batches = sum(len(b) for b in loaders.values())
    assert ours_calls == their_calls == batches  # one base pass per batch
