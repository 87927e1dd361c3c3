"""router_input="layer": every target layer routes its own input tokens (MixLoRA, LoRAMoE),
in the same single base pass; forced gates bypass the layers' routers."""
import json

import pytest
import torch
from conftest import VOCAB, make_batch, make_moe, randomize_experts
from test_generate import greedy_without_cache, left_pad
from trainrun import SMALL

from dylora_moe.model import DyLoRAMoE
from dylora_moe.model.balance import balance_loss
from dylora_moe.recipe import load_recipe


def layer_moe(**cfg):
    moe = make_moe("llama", num_experts=4, routing="token", router_input="layer", **cfg)
    randomize_experts(moe, scale=1.0)
    with torch.no_grad():  # routers far from uniform, so that routing matters
        for layer in moe.experts.values():
            layer.lora_router.normal_(0, 1.0)
    return moe


def test_each_layer_routes_its_own_tokens_and_every_router_learns():
    moe = layer_moe(balance_coefficient=0.1)
    moe.train()
    batch, _ = make_batch()
    out = moe(**batch)
    recorded = moe._slot.recorded  # every layer's gates of this forward
    assert len(recorded) == len(moe.experts)
    assert out.routing_weights.shape == (*batch["input_ids"].shape, 4)
    assert not torch.allclose(recorded[0], recorded[1])  # two layers, two routings
    units = batch["attention_mask"].bool()
    expected = torch.stack([balance_loss(g, units) for g in recorded]).mean()
    assert torch.equal(out.balance_loss, expected)
    out.loss.backward()
    assert all(layer.lora_router.grad is not None and layer.lora_router.grad.abs().sum() > 0
               for layer in moe.experts.values())
    assert moe.router.gate.weight.grad is None
    assert moe.router.gate.weight not in set(moe.trainable_parameters())


def test_forced_gates_ignore_the_layer_routers():
    moe = layer_moe()
    moe.eval()
    batch, _ = make_batch()
    one_hot = torch.tensor([0.0, 0.0, 1.0, 0.0])
    with torch.no_grad(), moe.override_gates(one_hot):
        forced = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            for layer in moe.experts.values():
                layer.lora_router.normal_(0, 1.0)  # other routers: the same forced output
        again = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(forced, again, atol=0, rtol=0)
    with torch.no_grad():
        routed = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(routed, forced, atol=1e-3)



def test_the_base_alone_scores_with_no_expert_and_no_routing():
    """`eval --variants base` and the benchmarks' base row switch the experts off: the
    layers then route nothing, and the forward is the base's, with zero gates."""
    from dylora_moe.eval.losses import batch_losses

    moe = layer_moe()
    moe.eval()
    batch, _ = make_batch()
    with torch.no_grad(), moe.experts_disabled():
        out = moe(**batch)
        scored = batch_losses(moe, batch)
    with torch.no_grad():
        for layer in moe.experts.values():
            layer.lora_B.zero_()  # experts that add nothing: the base's own output
        base = moe(**batch).logits
    torch.testing.assert_close(out.logits, base)
    assert out.routing_weights.shape == (*batch["input_ids"].shape, 4) and not out.routing_weights.any()
    assert out.balance_loss == 0 and not scored["gates"].any()

def test_cached_generation_equals_full_recompute():
    moe = layer_moe()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    out = moe.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(out, greedy_without_cache(moe, prompt, 8))


def test_batched_generation_equals_one_prompt_at_a_time():
    moe = layer_moe()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (length,), generator=g) for length in (3, 9, 5)]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    one = [moe.generate(p[None], **kwargs)[0, len(p):] for p in prompts]
    ids, mask = left_pad(prompts)
    batched = moe.generate(ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    for single, row in zip(one, batched):
        assert torch.equal(single, row)


def test_save_load_and_growth_keep_the_layer_routers(tmp_path):
    moe = layer_moe()
    moe.eval()
    batch, _ = make_batch()
    with torch.no_grad():
        before = moe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    moe.save_pretrained(tmp_path / "experts")
    loaded = DyLoRAMoE.from_pretrained(make_moe("llama").unload(), tmp_path / "experts").eval()
    with torch.no_grad():
        after = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    loaded.add_expert()
    assert next(iter(loaded.experts.values())).lora_router.shape[0] == 5
    with torch.no_grad():
        grown = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(grown, before, atol=1e-6, rtol=0)  # admission 0: nothing changes yet


@pytest.mark.parametrize("routing", [["--routing", "token"], ["--routing", "token", "--router_input", "layer"],
                                     ["--routing", "sequence"]])
def test_packed_rows_train_with_every_routing(routing, tmp_path, fresh_accelerate):
    from dylora_moe.train.loop import train

    cfg = load_recipe(SMALL[1], SMALL[2:] + ["--output_dir", str(tmp_path / "run"), "--packing", "true",
                                             "--max_steps", "3", *routing])
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        by_source = record["gate_mean_by_source"]
        assert set(by_source) == {"demo:numbers", "demo:strings"}
        assert all(abs(sum(g) - 1) < 1e-6 for g in by_source.values())
