"""The shapes the plan counts: a base built on the meta device with the experts
injected, read into plain numbers (no weights are read or allocated)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..data import build_demo_tokenizer
from ..errors import UserError
from ..model import DyLoRAMoE
from ..model.hub_configs import known_configs
from ..model.layer import StackedLoRALinear, is_linear_like, linear_shape
from ..model.blocks import decoder_blocks
from ..model.tiny import TINY_PREFIX, tiny_config
from ..recipe import base_files

# Output projections read their own input; other Linears of one block that share an
# input width read the same tensor (q/k/v, gate/up). Used to count shared inputs once.
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "wo", "w2"}
# Activations written as several Python ops save several tensors of the MLP's width
# for backward; torch's own kernels (F.gelu, F.silu, ...) save just their input.
ACTIVATION_SAVES = {"NewGELUActivation": 4, "FastGELUActivation": 4, "AccurateGELUActivation": 4,
                    "QuickGELUActivation": 2}


@dataclass
class LinearShape:
    name: str              # relative to its decoder layer, e.g. self_attn.q_proj
    in_features: int
    out_features: int

    @property
    def input_key(self) -> tuple:
        """Linears with equal keys read the same input tensor (q/k/v, gate/up)."""
        parent, _, leaf = self.name.rpartition(".")
        return parent, self.in_features, self.name if leaf in OUTPUT_PROJECTIONS else ""


@dataclass
class ModelShape:
    """What the estimate needs from a base model + experts, read off the meta model."""
    base_model: str
    source: str                     # where the config came from
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    num_heads: int
    kv_heads: int
    head_dim: int
    base_params: int                # frozen base, tied weights once
    quantizable_params: int         # weights bitsandbytes would quantize (Linears but the LM head)
    base_buffer_bytes: int
    expert_params: int              # stacked A and B of every target (and its own router, if any)
    router_params: int
    layer_linears: list = field(default_factory=list)   # LinearShape of every base Linear of one layer
    layer_targets: list = field(default_factory=list)   # the ones wrapped by experts
    layer_norms: list = field(default_factory=list)     # (width, computes_in_fp32) per norm of one layer
    final_norm: Optional[tuple] = None
    gated_mlp: bool = True
    activation_saves: int = 1
    attention: str = "sdpa"
    largest_linear: int = 0         # out*in of the largest quantizable Linear
    loss_chunk_tokens: int = 0      # what the model will use in training (0 = plain loss)
    # For a sharded base (sharded.py): what is gathered at once, what stays whole.
    block_params: int = 0           # one decoder block's frozen parameters
    block_quantizable: int = 0      # of which bitsandbytes would quantize
    embedding_params: int = 0       # the input embeddings
    head_params: int = 0            # an untied LM head (0 when tied to the embeddings)
    base_param_sizes: list = field(default_factory=list)    # numel of each frozen parameter
    expert_param_sizes: list = field(default_factory=list)  # numel of each stacked A, B and the router gate

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def known_shapes() -> dict:
    """Hub ids whose shape we carry, for planning offline (no hub, no cache)."""
    return known_configs()


def resolve_base_config(model_cfg):
    """(HF config, where it came from) for the recipe's base model; reads no weights."""
    name = model_cfg.base_model
    if name.startswith(TINY_PREFIX):
        vocab = tiny_vocab(model_cfg)
        try:
            return tiny_config(name[len(TINY_PREFIX):], vocab_size=vocab, **model_cfg.tiny), f"tiny-random, vocab {vocab}"
        except TypeError as e:
            raise UserError(f"model.tiny={model_cfg.tiny!r}: {e}") from None
        except ValueError as e:
            raise UserError(f"model.base_model={name!r}: {e}") from None
    files = base_files(model_cfg)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **files), "its config.json (local)"
    except (OSError, ValueError):
        pass
    if name in known_shapes():
        return known_shapes()[name](), "a built-in copy of its config.json (not in the local HF cache)"
    try:
        return AutoConfig.from_pretrained(name, **files), "its config.json (hub)"
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.base_model={name!r}: cannot read its config ({first})") from None


def tiny_vocab(model_cfg) -> int:
    """The vocabulary a tiny-random base gets: the tokenizer's size (build.build_base_model)."""
    if model_cfg.tokenizer == "demo":
        # The demo BPE is trained up to this size; an upper bound for planning.
        return inspect.signature(build_demo_tokenizer).parameters["vocab_size"].default
    if model_cfg.tokenizer:
        try:
            from transformers import AutoTokenizer

            return len(AutoTokenizer.from_pretrained(model_cfg.tokenizer, local_files_only=True))
        except (OSError, ValueError):
            pass
    return inspect.signature(tiny_config).parameters["vocab_size"].default


def meta_moe(hf_config, moe_cfg, attn_implementation=None):
    """The base model and its experts on the meta device: shapes only, nothing allocated."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        return DyLoRAMoE(base, moe_cfg)


def model_shape(hf_config, moe_cfg, base_model: str = "", source: str = "", attn_implementation=None) -> ModelShape:
    """Count parameters and read one decoder layer's structure from the meta model."""
    moe = meta_moe(hf_config, moe_cfg, attn_implementation)
    base = moe.base_model
    text = base.config.get_text_config()
    layers = decoder_layers(base, text.num_hidden_layers)
    head = base.get_output_embeddings()
    frozen = [p for n, p in base.named_parameters() if "lora_" not in n]  # tied weights listed once
    base_linears = [m.weight.numel() for m in base.modules() if is_linear_like(m) and m is not head]
    quantizable, largest = sum(base_linears), max(base_linears, default=0)
    layer = layers[0]
    block = [p for n, p in layer.named_parameters() if "lora_" not in n]
    embedding = base.get_input_embeddings().weight
    untied_head = head is not None and head.weight is not embedding
    linears, targets = [], []
    for name, module in layer.named_modules():
        if isinstance(module, StackedLoRALinear):
            targets.append(LinearShape(name, module.in_features, module.out_features))
        elif is_linear_like(module):
            name = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
            linears.append(LinearShape(name, *linear_shape(module)))
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    mlp_outs = [l.out_features for l in linears if l.out_features in (intermediate, 2 * intermediate)]
    return ModelShape(
        base_model=base_model, source=source, num_layers=len(layers), hidden=hidden, intermediate=intermediate,
        vocab=text.vocab_size, num_heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim, base_params=sum(p.numel() for p in frozen), quantizable_params=quantizable,
        base_buffer_bytes=sum(b.numel() * b.element_size() for b in base.buffers()),
        expert_params=sum(p.numel() for l in moe.experts.values() for n, p in l.named_parameters()
                          if n.startswith("lora_")),  # A, B and a layer's own router
        router_params=sum(p.numel() for p in moe.router.parameters() if p.requires_grad),
        layer_linears=linears, layer_targets=targets,
        layer_norms=[norm_shape(m, hidden) for m in layer.modules() if is_norm(m)],
        final_norm=next((norm_shape(m, hidden) for n, m in base.named_modules()
                         if is_norm(m) and not n.startswith(layer_prefix(base, layers))), None),
        # Two Linears to the MLP width (gate and up) or one fused to twice it: a gated MLP.
        gated_mlp=len(mlp_outs) >= 2 or 2 * intermediate in mlp_outs,
        activation_saves=next((ACTIVATION_SAVES.get(type(m).__name__, 1) for m in layer.modules()
                               if is_activation(m)), 1),
        attention=base.config._attn_implementation or "sdpa", largest_linear=largest,
        loss_chunk_tokens=moe.loss_chunk_tokens(),
        block_params=sum(p.numel() for p in block),
        block_quantizable=sum(m.weight.numel() for m in layer.modules() if is_linear_like(m)
                              and not isinstance(m, StackedLoRALinear)),
        embedding_params=embedding.numel(), head_params=head.weight.numel() if untied_head else 0,
        base_param_sizes=[p.numel() for p in frozen],
        expert_param_sizes=[p.numel() for p in moe.trainable_parameters()])


def decoder_layers(base, num_layers: int):
    layers = decoder_blocks(base)
    if len(layers) != num_layers:
        raise ValueError(f"{type(base).__name__}: no list of {num_layers} decoder layers found")
    return layers


def layer_prefix(base, layers) -> str:
    return next(n for n, m in base.named_modules() if m is layers)


def is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def norm_shape(module, hidden: int) -> tuple[int, bool]:
    """(width it normalises, computes in fp32). RMSNorms upcast to fp32 and keep that
    copy for backward; nn.LayerNorm keeps its input in the activation dtype. A norm
    narrower than the hidden size is a per-head q/k norm: count it at the query width."""
    weight = getattr(module, "weight", None)
    width = hidden if weight is None or weight.numel() == hidden else -1
    return width, not isinstance(module, nn.LayerNorm)


def is_activation(module) -> bool:
    kind = type(module)
    return kind.__module__.startswith("transformers.activations") or kind.__module__ == nn.modules.activation.__name__
