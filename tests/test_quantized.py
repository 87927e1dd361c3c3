"""4-bit / 8-bit (bitsandbytes) frozen bases: the QLoRA setting, on CPU."""
import pytest
import torch

from conftest import VOCAB, make_batch
from trainrun import losses
from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.quantized import quantization_config, quantized_layers
from dylora_moe.model.tiny import random_causal_lm, tiny_config

bnb = pytest.importorskip("bitsandbytes")


def quantized_base(tmp_path, bits, arch="gemma", **shape):
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"base-{arch}"
    if not path.exists():
        random_causal_lm(tiny_config(arch, vocab_size=VOCAB, **shape), seed=0).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(bits, torch.float32))


def frozen_state(moe):
    """Every tensor of the base (quantized weights, their scales, norms, embeddings)."""
    experts = {id(p) for p in moe.trainable_parameters()}
    out = {n: p.detach().clone() for n, p in moe.base_model.named_parameters() if id(p) not in experts}
    for name, layer in quantized_layers(moe.base_model).items():
        for key, value in getattr(layer.weight, "quant_state", None).as_dict(packed=True).items() \
                if getattr(layer.weight, "quant_state", None) is not None else []:
            if torch.is_tensor(value):
                out[f"{name}.{key}"] = value.clone()
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_experts_only(tmp_path, bits):
    torch.manual_seed(0)
    moe = DyLoRAMoE(quantized_base(tmp_path, bits), MoEConfig(num_experts=2, lora_dropout=0.0))
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    # The experts wrap the bitsandbytes layers as they are: nothing dequantized into memory.
    assert moe.experts and all(isinstance(layer.base_layer, kind) for layer in moe.experts.values())
    assert all(layer.base_layer.weight.dtype in (torch.uint8, torch.int8) for layer in moe.experts.values())
    before_base = frozen_state(moe)
    before_experts = {n: p.detach().clone() for n, p in moe.expert_state_dict().items()}
    batch, prompt = make_batch()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-2)
    moe.train()
    losses = []
    for _ in range(12):
        out = moe(**batch, prompt_mask=prompt)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    for name, value in moe.expert_state_dict().items():
        if name.endswith(("lora_A", "lora_B")):
            assert not torch.equal(value, before_experts[name]), f"{name} did not change"
    after_base = frozen_state(moe)
    assert after_base.keys() == before_base.keys()
    for name, value in before_base.items():
        assert torch.equal(after_base[name], value), f"frozen base tensor {name} changed"


def test_4bit_gradients_equal_the_dequantized_reference_after_an_eval_pass(tmp_path):
    """An fp32 model holding the dequantized NF4 weights must get the same expert
    gradients. The no-grad eval pass first is the bitsandbytes CPU trap (quantized.py):
    without our fix it repacks the weights into a kernel with no autograd, and the
    gradients silently lose the base path."""
    quantized = quantized_base(tmp_path, 4, arch="llama", num_kv_heads=4)
    reference = random_causal_lm(tiny_config("llama", vocab_size=VOCAB, num_kv_heads=4), seed=0)
    with torch.no_grad():
        for name, layer in quantized_layers(quantized).items():
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
            reference.get_submodule(name).weight.copy_(weight)
    mixtures = []
    for base in (quantized, reference):
        torch.manual_seed(1)
        mixtures.append(DyLoRAMoE(base, MoEConfig(num_experts=2, lora_dropout=0.0)))
    q, ref = mixtures
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for a, b in zip(q.experts.values(), ref.experts.values()):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.2)
            b.lora_B.copy_(a.lora_B)
            b.lora_A.copy_(a.lora_A)
        ref.router.load_state_dict(q.router.state_dict())
    batch, prompt = make_batch()
    q.eval()
    with torch.no_grad():
        q(**batch, prompt_mask=prompt)  # an eval pass: where bitsandbytes would repack the weights
    for moe in mixtures:
        moe.train()
        moe(**batch, prompt_mask=prompt).loss.backward()
    for name, a in q.experts.items():
        b = ref.experts[name]
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_save_and_load_experts_of_a_quantized_base(tmp_path):
    torch.manual_seed(0)
    moe = DyLoRAMoE(quantized_base(tmp_path, 4), MoEConfig(num_experts=2, lora_dropout=0.0))
    with torch.no_grad():
        for layer in moe.experts.values():
            layer.lora_B.normal_(0, 0.1)
    moe.save_pretrained(tmp_path / "experts")
    loaded = DyLoRAMoE.from_pretrained(quantized_base(tmp_path, 4), tmp_path / "experts")
    batch, prompt = make_batch()
    moe.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, prompt_mask=prompt).logits, moe(**batch, prompt_mask=prompt).logits)
    # The mixture's state is the experts and router only: no quantization keys to trip over.
    assert set(moe.state_dict()) == set(loaded.state_dict())
    assert not any("absmax" in k or "quant" in k for k in moe.state_dict())


def test_recipe_trains_on_a_4bit_base_and_eval_reloads_it(tmp_path):
    from dylora_moe.eval.loading import load_run
    from dylora_moe.recipe import load_recipe
    from dylora_moe.train.loop import train

    cfg = load_recipe("configs/demo.yaml", ["--demo_examples", "80", "--max_seq_length", "96",
                                            "--train_batch_size", "4", "--max_steps", "10", "--eval_every", "5", "--log_every", "1",
                                            "--output_dir", str(tmp_path / "run"), "--load_in_4bit"])
    train(cfg)
    per_step = losses(tmp_path / "run")
    assert sorted(per_step) == list(range(1, 11))
    assert per_step[10] < per_step[1] - 0.5, per_step
    loaded = load_run(tmp_path / "run")
    assert quantized_layers(loaded.moe.base_model)  # evaluated on the base it was trained against


def test_both_quantizations_is_a_config_error():
    from dylora_moe.recipe import load_recipe

    with pytest.raises(ValueError, match="load_in_4bit and model.load_in_8bit"):
        load_recipe("configs/demo.yaml", ["--load_in_4bit", "--load_in_8bit"])
