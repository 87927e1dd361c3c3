"""Random-weight causal LMs built from configs: the offline default, tests and benchmarks.

No download happens here. Real runs load hub checkpoints (e.g. google/codegemma-2b);
these builders give the same architectures at any size so everything runs offline.
"""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, PhiConfig

ARCHITECTURES = ("gemma", "llama", "gpt2", "gpt_neox", "phi")
# A recipe's model.base_model = "tiny-random:<arch>" asks for one of these (offline).
TINY_PREFIX = "tiny-random:"

# google/codegemma-2b's shape (its config.json): what the GPU benchmark runs.
CODEGEMMA_2B = dict(vocab_size=256000, hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
                    num_key_value_heads=1, head_dim=256, intermediate_size=16384)


def tiny_config(arch: str = "gemma", vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 1, intermediate_size: int = 128,
                max_positions: int = 512, head_dim: int | None = None, initializer_range: float = 0.02):
    head_dim = head_dim or hidden_size // num_heads
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  initializer_range=initializer_range)
    if arch == "gemma":
        return GemmaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, head_dim=head_dim,
                           max_position_embeddings=max_positions, **common)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_kv_heads, head_dim=head_dim,
                           max_position_embeddings=max_positions, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=intermediate_size,
                          n_positions=max_positions, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             max_position_embeddings=max_positions, **common)
    if arch == "phi":
        return PhiConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         max_position_embeddings=max_positions, **common)
    raise ValueError(f"arch={arch!r}: expected one of {ARCHITECTURES}")


def random_causal_lm(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A causal LM with seeded random weights, in eval-friendly fp32 by default."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random LMs from configs keep HF's dropout defaults (GPT-2: 0.1); zero them so that
    # the only randomness in a step is the experts' own dropout.
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def codegemma_2b_config(vocab_size: int | None = None):
    shape = dict(CODEGEMMA_2B)
    if vocab_size:
        shape["vocab_size"] = vocab_size
    return GemmaConfig(max_position_embeddings=8192, bos_token_id=2, eos_token_id=1, pad_token_id=0, **shape)
