"""Target auto-detection across architectures: every Linear of the attention blocks,
fused (qkv_proj, query_key_value, Wqkv, c_attn) and output projections (o_proj,
out_proj, dense, c_proj) alike, never an MLP layer; and the log says what was targeted."""
import logging

import pytest
import torch
import transformers as T

from dylora_moe import DyLoRAMoE, MoEConfig

SMALL = dict(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Tiny random configs (the config classes ship with transformers: nothing is downloaded).
CONFIGS = {
    "phi3": (lambda: T.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, **SMALL), {"qkv_proj", "o_proj"}),
    "codegen": (lambda: T.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **SMALL),
                {"qkv_proj", "out_proj"}),
    "gptj": (lambda: T.GPTJConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, **SMALL),
             {"q_proj", "k_proj", "v_proj", "out_proj"}),
    "opt": (lambda: T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, word_embed_proj_dim=32, **SMALL),
            {"q_proj", "k_proj", "v_proj", "out_proj"}),
    "falcon": (lambda: T.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **SMALL),
               {"query_key_value", "dense"}),
    "bloom": (lambda: T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SMALL), {"query_key_value", "dense"}),
    "mpt": (lambda: T.MptConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **SMALL), {"Wqkv", "out_proj"}),
    "gpt2": (lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL), {"c_attn", "c_proj"}),
    "gpt_bigcode": (lambda: T.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL),
                    {"c_attn", "c_proj"}),
    "gpt_neo": (lambda: T.GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                       attention_types=[[["global", "local"], 1]], **SMALL),
                {"q_proj", "k_proj", "v_proj", "out_proj"}),
    "gpt_neox": (lambda: T.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, **SMALL), {"query_key_value", "dense"}),
    "phi": (lambda: T.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                **SMALL), {"q_proj", "k_proj", "v_proj", "dense"}),
    "llama": (lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, **SMALL), {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "qwen2": (lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, **SMALL), {"q_proj", "k_proj", "v_proj", "o_proj"}),
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_auto_targets_cover_fused_and_output_projections(arch, caplog):
    make_config, expected = CONFIGS[arch]
    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(make_config())
    with caplog.at_level(logging.INFO, logger="dylora_moe.model.inject"):
        moe = DyLoRAMoE(base, MoEConfig(num_experts=2, lora_r=2, lora_dropout=0.0))
    leaves = [name.rsplit(".", 1)[-1] for name in moe.experts]
    assert set(leaves) == expected, sorted(moe.experts)
    assert len(leaves) == 2 * len(expected)  # each projection of both layers, once
    assert all(leaf in caplog.text for leaf in expected) and "of 4 module" not in caplog.text
    assert f"2 expert(s) on {len(leaves)} module(s)" in caplog.text
    ids = torch.randint(3, 60, (2, 6))
    out = moe(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    out.loss.backward()  # the experts are wired in: every one of their layers gets a gradient
    assert all(layer.lora_A.grad is not None for layer in moe.experts.values())


def test_absurd_adapter_size_is_refused_before_allocating(monkeypatch):
    from dylora_moe.model import inject

    base = T.AutoModelForCausalLM.from_config(CONFIGS["llama"][0]())
    monkeypatch.setattr(inject, "_memory_bytes", lambda layer: 2**20)  # a 1 MiB machine
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts=64 x lora_r=64 on 8 modules: .* do not fit"):
        DyLoRAMoE(base, MoEConfig(num_experts=64, lora_r=64))
    assert not any("lora" in n for n, _ in base.named_parameters())  # nothing was injected


def test_num_experts_has_an_upper_bound():
    with pytest.raises(ValueError, match=r"MoEConfig.num_experts=10000000: expected at most 1024"):
        MoEConfig(num_experts=10_000_000)
