"""One base pass for all experts; stacked == the per-expert reference (tests/reference.py)
== PEFT under one-hot routing."""
import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, make_base, make_batch, make_moe, randomize_experts
from reference import reference_forward

from dylora_moe import DyLoRAMoE, MoEConfig


def count_base_calls(moe):
    """Forward hook on one frozen base Linear: (grad enabled?, sequence length) per call."""
    calls = []
    layer = next(iter(moe.experts.values())).base_layer
    layer.register_forward_hook(lambda m, args, out: calls.append((torch.is_grad_enabled(), args[0].shape[1])))
    return calls


@pytest.mark.parametrize("num_experts", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_one_base_forward_per_training_step(num_experts, router_input):
    moe = make_moe(num_experts=num_experts, router_input=router_input)
    moe.train()
    batch, prompt = make_batch()
    calls = count_base_calls(moe)
    moe(**batch, prompt_mask=prompt).loss.backward()
    if router_input == "embeddings":
        assert calls == [(True, batch["input_ids"].shape[1])]
    else:
        # a no-grad routing pass over the prompt tokens only, then the one training pass
        assert calls == [(False, int(prompt.sum(1).max())), (True, batch["input_ids"].shape[1])]


@pytest.mark.parametrize("arch", ARCHS)
def test_one_hot_routing_matches_the_reference_and_peft(arch, tmp_path):
    from peft import PeftModel

    deltas = make_moe(arch, num_experts=3)
    randomize_experts(deltas)
    batch, _ = make_batch()
    deltas.eval()
    for i in range(3):
        one_hot = F.one_hot(torch.tensor(i), 3).float()
        with torch.no_grad(), deltas.override_gates(one_hot):
            got = deltas(**batch).logits
            ref, _ = reference_forward(deltas, **batch)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

        deltas.export_expert(i, tmp_path / f"expert{i}")
        peft_model = PeftModel.from_pretrained(make_base(arch), tmp_path / f"expert{i}").eval()
        with torch.no_grad():
            peft_logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(got, peft_logits, atol=1e-5, rtol=0)
        # and the expert really matters: the base alone differs
        with torch.no_grad(), deltas.experts_disabled():
            base_logits = deltas.base_model(input_ids=batch["input_ids"]).logits
        assert not torch.allclose(base_logits, got, atol=1e-3)


@pytest.mark.parametrize("router_input", ["embeddings", "base_hidden"])
def test_router_top1_in_eval_matches_the_reference(router_input):
    """With the real router (not an override): straight-through top-1 gates are one-hot per sequence,
    so the stacked pass equals the per-expert reference loop. (Not so per token: there a
    token's attention reads earlier tokens computed by *their* experts in one pass, by
    the same expert in each reference pass.)"""
    deltas = make_moe(num_experts=4, router_input=router_input, gating="straight_through")
    randomize_experts(deltas)
    deltas.eval()
    batch, _ = make_batch()
    with torch.no_grad():
        a = deltas(**batch)
        logits, gates = reference_forward(deltas, **batch)
    assert torch.equal(a.routing_weights, gates)
    torch.testing.assert_close(a.logits, logits, atol=1e-5, rtol=0)


def test_dense_training_mixture_equals_sum_of_gated_deltas():
    """The stacked layer's maths, checked against E separate LoRAs written out by hand."""
    moe = make_moe(num_experts=3)
    randomize_experts(moe)
    name, layer = next(iter(moe.experts.items()))
    x = torch.randn(2, 5, layer.in_features)
    gates = torch.softmax(torch.randn(2, 1, 3), -1)
    moe.set_gates(gates)
    expected = layer.base_layer(x)
    for e in range(3):
        a, b = layer.expert_weights(e)
        # gates sum to 1; the mixture's scale is alpha / r times the number of experts
        expected = expected + gates[..., e : e + 1] * 3 * layer.scaling * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_uniform_mixture_is_one_lora_of_rank_e_times_r_at_the_same_alpha_over_r():
    """The scale that makes a recipe's learning rate fit a mixture and a LoRA alike."""
    moe = make_moe(num_experts=4, lora_r=2, lora_alpha=4)
    randomize_experts(moe)
    layer = next(iter(moe.experts.values()))
    x = torch.randn(2, 5, layer.in_features)
    moe.set_gates(torch.full((1, 1, 4), 0.25))
    lora = layer.base_layer(x) + (4 / 2) * (x @ layer.lora_A.T @ layer.lora_B.T)  # rank 8, alpha / r = 2
    torch.testing.assert_close(layer(x), lora, atol=1e-6, rtol=0)


def test_target_autodetection_per_architecture():
    expected = {"gemma": 8, "llama": 8, "gpt2": 4, "gpt_neox": 4}  # 2 layers each (more in tests/test_targets.py)
    for arch, n in expected.items():
        moe = make_moe(arch)
        assert len(moe.experts) == n, arch
    gpt2 = make_moe("gpt2")
    assert {name.rsplit(".", 1)[-1] for name in gpt2.experts} == {"c_attn", "c_proj"}
    assert all(".attn." in name for name in gpt2.experts)  # attention's c_proj, not the MLP's


def test_model_without_targets_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target_modules.*Linear-like modules are named .*'gate_proj'"):
        DyLoRAMoE(make_base("llama"), MoEConfig(target_modules=["query"]))


def test_explicit_targets_and_mlp_layers():
    moe = DyLoRAMoE(make_base("llama"), MoEConfig(target_modules=["down_proj", "layers.0.self_attn.q_proj"]))
    assert sorted(moe.experts) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                                   "model.layers.1.mlp.down_proj"]


def test_base_is_frozen_shared_and_not_copied():
    base = make_base()
    moe = DyLoRAMoE(base, MoEConfig())
    assert moe.base_model is base
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("router.") for n in trainable)


def test_bf16_autocast_and_fp32():
    moe = make_moe(num_experts=4)
    randomize_experts(moe)
    batch, _ = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(**batch)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.routing_weights.dtype == torch.float32
    assert torch.isfinite(out.loss)
    fp32 = moe(**batch)
    assert fp32.logits.dtype == torch.float32
    assert abs(fp32.lm_loss.item() - out.lm_loss.item()) < 0.05
    grads = [p.grad for p in moe.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_base_weights_without_autocast():
    """A base loaded in bf16 (as on GPU) with fp32 adapters: runs, trains, gates stay fp32."""
    from conftest import VOCAB
    from dylora_moe.model.tiny import random_causal_lm, tiny_config

    base = random_causal_lm(tiny_config("gemma", vocab_size=VOCAB), dtype=torch.bfloat16)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=4, lora_dropout=0.0))
    randomize_experts(moe)
    out = moe(**make_batch()[0])
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and out.routing_weights.dtype == torch.float32
    assert next(iter(moe.experts.values())).lora_A.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.trainable_parameters())
