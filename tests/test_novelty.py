"""The novelty trigger on the demo task families with the tiny demo base, in one process:
it fires for a family the experts never trained on, and not for more of the same."""
import pytest
import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.data import DataCollator, DataConfig, build_datasets, build_demo_tokenizer, load_examples
from dylora_moe.model.tiny import random_causal_lm, tiny_config
from dylora_moe.train.novelty import NoveltyMonitor

WINDOW = 3


@pytest.fixture(scope="module")
def demo():
    """A 4-expert mixture on the demo recipe's base, and micro-batches per family."""
    cfg = DataConfig(sources=[{"name": "demo", "family": "numbers"}, {"name": "demo", "family": "strings"}],
                     demo_examples=120, max_seq_length=128)
    examples = load_examples(cfg)
    tokenizer = build_demo_tokenizer([e["prompt"] + e["answer"] for s in examples.values() for e in s["train"]])
    bundle = build_datasets(cfg, tokenizer, examples)
    base = random_causal_lm(tiny_config("gemma", vocab_size=len(tokenizer), hidden_size=128, num_layers=2,
                                        intermediate_size=512, initializer_range=0.1), seed=0)
    torch.manual_seed(0)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=4, lora_r=8, router_input="embeddings")).eval()
    collate = DataCollator(tokenizer.pad_token_id)
    rows = {label: bundle.train.filter(lambda r, i=i: r["source_id"] == i) for i, label in enumerate(bundle.sources)}
    batches = {label: [collate([ds[j] for j in range(k, k + 8)]) for k in range(0, len(ds) - 8, 8)]
               for label, ds in rows.items()}
    return moe, bundle.sources, batches, (bundle, tokenizer)


def step(monitor, moe, batch):
    with torch.no_grad():
        gates = moe(**batch).routing_weights
    monitor.add(moe, batch, gates)
    return monitor.end_step(None, moe, torch.ones(moe.config.num_experts, dtype=torch.bool))


def test_novelty_fires_on_a_new_family_and_not_on_more_of_the_same(demo):
    moe, sources, batches, _ = demo
    numbers, strings = batches["demo:numbers"], batches["demo:strings"]
    monitor = NoveltyMonitor(sources, threshold=0.75, window=WINDOW, max_experts=5, enabled=True, state={})
    for batch in numbers[:4]:  # an empty library: the first data builds it
        assert step(monitor, moe, batch) is None
    assert int(moe.router.centroid_counts.sum()) == 32

    same = []
    for batch in numbers[4:]:  # more of the same (unseen examples): never novel
        assert step(monitor, moe, batch) is None
        same.append(monitor.last_similarity["demo:numbers"])
    assert len(same) >= 2 * WINDOW and min(same) >= 0.75

    new, request = [], None
    for batch in strings:
        request = step(monitor, moe, batch)
        new.append(monitor.last_similarity["demo:strings"])
        if request is not None:
            break
    assert request is not None and len(new) == WINDOW and max(new) < 0.75
    assert request.source == "demo:strings" and request.count == 8 * WINDOW
    print(f"similarity: same family {min(same):.3f}..{max(same):.3f}, new family {min(new):.3f}..{max(new):.3f}")

    index = moe.add_expert("zeros")
    monitor.seed(moe, index, request)
    assert step(monitor, moe, strings[WINDOW]) is None  # the new expert's entry covers it now
    assert monitor.last_similarity["demo:strings"] >= 0.75


def test_novelty_stops_at_max_experts_and_without_grow_on_novelty(demo):
    moe, sources, batches, _ = demo
    for enabled, max_experts in ((False, 8), (True, moe.config.num_experts)):
        monitor = NoveltyMonitor(sources, threshold=0.999, window=1, max_experts=max_experts, enabled=enabled,
                                 state={})
        step(monitor, moe, batches["demo:numbers"][0])  # builds the library if it is empty
        assert step(monitor, moe, batches["demo:strings"][0]) is None  # novel, but no growth
        assert monitor.last_similarity["demo:strings"] < 0.999


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_packed_rows_give_the_same_examples_as_unpacked(demo, routing):
    from dylora_moe.data import PackingCollator
    from dylora_moe.train.novelty import answer_embeddings

    _, _, _, (bundle, tokenizer) = demo
    moe = make_moe_for(tokenizer, routing)
    rows = [bundle.train[i] for i in range(8)]
    got = []
    for batch in (DataCollator(tokenizer.pad_token_id)(rows), PackingCollator(tokenizer.pad_token_id, 256)(rows)):
        with torch.no_grad():
            got.append(answer_embeddings(moe, batch, moe(**batch).routing_weights))
    (plain, plain_source, plain_top1), (packed, packed_source, packed_top1) = got
    assert batch["input_ids"].shape[0] < 8  # several examples per packed row
    assert packed.shape == plain.shape == (8, 128)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    assert packed_source.tolist() == plain_source.tolist() and packed_top1.tolist() == plain_top1.tolist()


def make_moe_for(tokenizer, routing):
    base = random_causal_lm(tiny_config("gemma", vocab_size=len(tokenizer), hidden_size=128, num_layers=2,
                                        intermediate_size=512), seed=1)
    torch.manual_seed(1)
    return DyLoRAMoE(base, MoEConfig(num_experts=3, routing=routing, lora_dropout=0.0)).eval()
