"""Built-in copies of the published config.json of the larger code bases the shipped
recipes name, so that `dylora-moe plan` can plan them offline (no hub, no cache). Only
shapes: nothing here is downloaded or holds weights. A local config.json (the HF cache,
or a model folder) always takes precedence (plan.resolve_base_config)."""
from __future__ import annotations

from transformers import GemmaConfig, LlamaConfig, Starcoder2Config

from .tiny import codegemma_2b_config


def codegemma_7b_config():
    """google/codegemma-7b: Gemma 7B (multi-head attention, 256-wide heads, tied head)."""
    return GemmaConfig(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                       max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                       rope_theta=10000.0, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def starcoder2_15b_config():
    """bigcode/starcoder2-15b: grouped KV (4 heads), biased Linears, LayerNorm, plain MLP."""
    return Starcoder2Config(vocab_size=49152, hidden_size=6144, intermediate_size=24576, num_hidden_layers=40,
                            num_attention_heads=48, num_key_value_heads=4, max_position_embeddings=16384,
                            hidden_act="gelu_pytorch_tanh", norm_epsilon=1e-5, rope_theta=100000.0,
                            sliding_window=4096, use_bias=True, tie_word_embeddings=False,
                            bos_token_id=0, eos_token_id=0)


def codellama_34b_config():
    """codellama/CodeLlama-34b-hf: Llama 2 34B shape (grouped KV, 8 heads), untied head."""
    return LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=16384,
                       hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2)


def known_configs() -> dict:
    """Hub id -> a function building its config."""
    return {"google/codegemma-2b": codegemma_2b_config, "google/codegemma-7b": codegemma_7b_config,
            "bigcode/starcoder2-15b": starcoder2_15b_config, "codellama/CodeLlama-34b-hf": codellama_34b_config}
