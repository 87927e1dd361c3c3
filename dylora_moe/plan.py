"""`dylora-moe plan --config RECIPE`: peak GPU memory of a recipe, before launching it.

    dylora-moe plan --config configs/codegemma-2b.yaml
    dylora-moe plan --config configs/codegemma-2b.yaml --load_in_4bit --num_experts 8 --gpu L4
    dylora-moe plan --config configs/codegemma-2b.yaml --num_processes 8 --json

An estimate, not a measurement. The base model is built on the `meta` device from its
HF config (no weights are read or allocated) with the experts injected there too, so
any HF causal LM works; parameters are counted per kind, and the activations follow a
per-layer formula derived from the layer's modules (norms, attention, MLP, our stacked
LoRA layers) for the recipe's micro-batch and sequence length. Each component is
reported on its own, for every shipped accelerate config (single_gpu, multi_gpu,
zero2, zero2_offload, and with the base split over the processes zero3, fsdp2 and
zero3_offload: plan_sharding.py), then checked against common GPUs, with the first
config that fits recommended per GPU. Why each formula is what it is sits next to it;
the test (tests/test_plan.py) holds the estimate to the measured peak of real training
steps, one of them on a base sharded by FSDP2 over 2 processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .model.tiny import TINY_PREFIX

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]  # the repo: accelerate_configs/, ds_configs/

# What nvidia-smi reports as each card's total memory (MiB). The CUDA context and
# allocator slack come out of this, which is why the plan adds an allowance for them.
GPUS = {"A100-40GB": 40536, "A100-80GB": 81920, "H100-80GB": 81559, "L4-24GB": 23034}
# Vertex AI accelerator types (launch/vertex.py) -> the GPU above.
VERTEX_ACCELERATORS = {"NVIDIA_TESLA_A100": "A100-40GB", "NVIDIA_A100_80GB": "A100-80GB",
                       "NVIDIA_H100_80GB": "H100-80GB", "NVIDIA_L4": "L4-24GB"}
# Fixed per-process allowance on a GPU, beyond the tensors torch allocates: the CUDA
# context with torch's kernels (0.75 GiB measured on an H200: device use minus what
# torch reserved), cuBLAS/NCCL workspaces and the caching allocator's fragmentation
# (it held 1-4 GiB more than the allocated peak in the same runs).
CUDA_ALLOWANCE_GIB = 2.0
# Table rows whose detail differs between configs get these names (the JSON keeps it).
ROW_NAMES = {"experts": "experts + router", "gradients": "expert gradients", "optimizer": "optimizer states",
             "buckets": "ZeRO reduce buckets", "base": "base weights", "gathered": "gathered whole (sharded base)"}
# Output projections read their own input; other Linears of one block that share an
# input width read the same tensor (q/k/v, gate/up). Used to count shared inputs once.
OUTPUT_PROJECTIONS = {"o_proj", "out_proj", "dense", "c_proj", "down_proj", "fc2", "dense_4h_to_h", "wo", "w2"}
# Activations written as several Python ops save several tensors of the MLP's width
# for backward; torch's own kernels (F.gelu, F.silu, ...) save just their input.
ACTIVATION_SAVES = {"NewGELUActivation": 4, "FastGELUActivation": 4, "AccurateGELUActivation": 4,
                    "QuickGELUActivation": 2}


# ---------------------------------------------------------------------------- shape
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
    expert_params: int              # stacked A and B of every target
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
    # For a sharded base (plan_sharding.py): what is gathered at once, what stays whole.
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
    from .model.hub_configs import known_configs

    return known_configs()


def resolve_base_config(model_cfg):
    """(HF config, where it came from) for the recipe's base model; reads no weights."""
    name = model_cfg.base_model
    if name.startswith(TINY_PREFIX):
        from .model.tiny import tiny_config

        vocab = tiny_vocab(model_cfg)
        try:
            return tiny_config(name[len(TINY_PREFIX):], vocab_size=vocab, **model_cfg.tiny), f"tiny-random, vocab {vocab}"
        except TypeError as e:
            raise ValueError(f"model.tiny={model_cfg.tiny!r}: {e}") from None
        except ValueError as e:
            raise ValueError(f"model.base_model={name!r}: {e}") from None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, local_files_only=True), "its config.json (local)"
    except (OSError, ValueError):
        pass
    if name in known_shapes():
        return known_shapes()[name](), "a built-in copy of its config.json (not in the local HF cache)"
    try:
        return AutoConfig.from_pretrained(name), "its config.json (hub)"
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.base_model={name!r}: cannot read its config ({first})") from None


def tiny_vocab(model_cfg) -> int:
    """The vocabulary a tiny-random base gets: the tokenizer's size (build.build_base_model)."""
    if model_cfg.tokenizer == "demo":
        from .data import build_demo_tokenizer

        # The demo BPE is trained up to this size; an upper bound for planning.
        return inspect.signature(build_demo_tokenizer).parameters["vocab_size"].default
    if model_cfg.tokenizer:
        try:
            from transformers import AutoTokenizer

            return len(AutoTokenizer.from_pretrained(model_cfg.tokenizer, local_files_only=True))
        except (OSError, ValueError):
            pass
    from .model.tiny import tiny_config

    return inspect.signature(tiny_config).parameters["vocab_size"].default


def meta_moe(hf_config, moe_cfg, attn_implementation=None):
    """The base model and its experts on the meta device: shapes only, nothing allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    from .model import DyLoRAMoE

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        return DyLoRAMoE(base, moe_cfg)


def model_shape(hf_config, moe_cfg, base_model: str = "", source: str = "", attn_implementation=None) -> ModelShape:
    """Count parameters and read one decoder layer's structure from the meta model."""
    from .model.layer import StackedLoRALinear, is_linear_like, linear_shape

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
        expert_params=sum(l.lora_A.numel() + l.lora_B.numel() for l in moe.experts.values()),
        router_params=sum(p.numel() for p in moe.router.parameters()),
        layer_linears=linears, layer_targets=targets,
        layer_norms=[norm_shape(m, hidden) for m in layer.modules() if is_norm(m)],
        final_norm=next((norm_shape(m, hidden) for n, m in base.named_modules()
                         if is_norm(m) and not n.startswith(layer_prefix(base, layers))), None),
        # Two Linears to the MLP width (gate and up) or one fused to twice it: a gated MLP.
        gated_mlp=len(mlp_outs) >= 2 or 2 * intermediate in mlp_outs,
        activation_saves=next((ACTIVATION_SAVES.get(type(m).__name__, 1) for m in layer.modules()
                               if is_activation(m)), 1),
        attention=base.config._attn_implementation or "sdpa", largest_linear=largest,
        loss_chunk_tokens=moe._loss_chunk_tokens(),
        block_params=sum(p.numel() for p in block),
        block_quantizable=sum(m.weight.numel() for m in layer.modules() if is_linear_like(m)
                              and not isinstance(m, StackedLoRALinear)),
        embedding_params=embedding.numel(), head_params=head.weight.numel() if untied_head else 0,
        base_param_sizes=[p.numel() for p in frozen],
        expert_param_sizes=[p.numel() for p in moe.trainable_parameters()])


def decoder_layers(base, num_layers: int):
    from torch import nn

    for _, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(base).__name__}: no list of {num_layers} decoder layers found")


def layer_prefix(base, layers) -> str:
    return next(n for n, m in base.named_modules() if m is layers)


def is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def norm_shape(module, hidden: int) -> tuple[int, bool]:
    """(width it normalises, computes in fp32). RMSNorms upcast to fp32 and keep that
    copy for backward; nn.LayerNorm keeps its input in the activation dtype. A norm
    narrower than the hidden size is a per-head q/k norm: count it at the query width."""
    from torch import nn

    weight = getattr(module, "weight", None)
    width = hidden if weight is None or weight.numel() == hidden else -1
    return width, not isinstance(module, nn.LayerNorm)


def is_activation(module) -> bool:
    from torch import nn

    kind = type(module)
    return kind.__module__.startswith("transformers.activations") or kind.__module__ == nn.modules.activation.__name__


# ---------------------------------------------------------------------------- setup
@dataclass
class Strategy:
    """One shipped accelerate config, as the plan sees it."""
    name: str
    kind: str                     # "single" | "ddp" | "zero2" | "zero3" | "fsdp2"
    offload: bool = False         # ZeRO optimizer states + update on the CPU
    bucket_elements: int = 0      # ZeRO gradient reduce bucket (elements)
    buckets: int = 0              # 2 with overlap_comm (double buffering), else 1
    processes: int = 1            # world size the optimizer states (and a sharded base) are split over
    offload_params: bool = False  # ZeRO-3: the base's partitions in CPU memory
    prefetch_elements: int = 0    # ZeRO-3: stage3_prefetch_bucket_size
    reuse_distance: int = 0       # ZeRO-3: stage3_max_reuse_distance
    max_live: int = 0             # ZeRO-3: stage3_max_live_parameters
    persistence_threshold: int = 0  # ZeRO-3: stage3_param_persistence_threshold

    @property
    def sharded(self) -> bool:
        """The frozen base is partitioned over the processes."""
        return self.kind in ("zero3", "fsdp2")


# The shipped accelerate configs, cheapest in communication first: the order in which
# `plan` recommends the first one that fits.
SHIPPED = ("single_gpu", "multi_gpu", "zero2", "zero2_offload", "zero3", "fsdp2", "zero3_offload")
KINDS = {"NO": "single", "MULTI_GPU": "ddp", "DEEPSPEED": "zero2", "FSDP": "fsdp2"}


def shipped_strategies(processes: int = 1, root: Path = ROOT) -> list[Strategy]:
    """The SHIPPED configs as accelerate_configs/ ships them (multi_node_zero2 is
    zero2_offload per GPU). Without those files (an installed package) the same values
    are assumed."""
    return [strategy_of_config(root / "accelerate_configs" / f"{name}.yaml", processes, root) for name in SHIPPED]


def strategy_of_config(path: Path, processes: int = 1, root: Path = ROOT) -> Strategy:
    """An accelerate config (yaml) as the plan sees it."""
    import yaml

    name = Path(path).stem
    acc = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else {}
    default = ("DEEPSPEED" if name.startswith("zero") else "MULTI_GPU" if name == "multi_gpu"
               else "FSDP" if name.startswith("fsdp") else "NO")
    kind = KINDS[str(acc.get("distributed_type", default))]
    strategy = Strategy(name, kind, processes=1 if kind == "single" else processes)
    if kind == "zero2":
        ds_file = (acc.get("deepspeed_config") or {}).get("deepspeed_config_file", f"ds_configs/{name}.json")
        apply_zero_settings(strategy, root / ds_file)
    return strategy


def apply_zero_settings(strategy: Strategy, ds_json: Path) -> Strategy:
    """Offload and gradient buckets from a DeepSpeed JSON (DeepSpeed's defaults where unset)."""
    shipped = {"offload_optimizer": {"device": "cpu"} if strategy.name.endswith("offload") else None,
               "reduce_bucket_size": 2e8, "overlap_comm": True, "contiguous_gradients": True}
    if strategy.name.startswith("zero3"):
        shipped.update(stage=3, reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7,
                       stage3_param_persistence_threshold=2e6,
                       offload_param={"device": "cpu"} if strategy.name.endswith("offload") else None)
    zero = json.loads(ds_json.read_text()).get("zero_optimization", {}) if ds_json.is_file() else shipped
    strategy.offload = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    strategy.bucket_elements = int(zero.get("reduce_bucket_size", 5e8))
    # contiguous_gradients: DeepSpeed copies gradients into these buckets (two with overlap_comm).
    strategy.buckets = (2 if zero.get("overlap_comm") else 1) if zero.get("contiguous_gradients", True) else 0
    if int(zero.get("stage", 2)) == 3:  # DeepSpeed's defaults where the JSON says nothing
        strategy.kind = "zero3"
        strategy.offload_params = (zero.get("offload_param") or {}).get("device") == "cpu"
        strategy.prefetch_elements = int(zero.get("stage3_prefetch_bucket_size", 5e7))
        strategy.reuse_distance = int(zero.get("stage3_max_reuse_distance", 1e9))
        strategy.max_live = int(zero.get("stage3_max_live_parameters", 1e9))
        strategy.persistence_threshold = int(zero.get("stage3_param_persistence_threshold", 1e5))
    return strategy


def strategy_from_env(env=None) -> Strategy:
    """The strategy of the running job, from what `accelerate launch` puts in the environment."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        ds_file = Path(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""))
        stage3 = ds_file.is_file() and json.loads(ds_file.read_text()).get("zero_optimization", {}).get("stage") == 3
        name = ("zero3" if stage3 else "zero2") + ("_offload" if "offload" in ds_file.name else "")
        return apply_zero_settings(Strategy(name, "zero2", processes=world), ds_file)
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return Strategy("fsdp2", "fsdp2", processes=world)
    return Strategy("multi_gpu", "ddp", processes=world) if world > 1 else Strategy("single_gpu", "single")


@dataclass
class Step:
    """One micro-batch as the recipe runs it."""
    batch: int
    seq: int
    act_bytes: int                # activation dtype (bf16 = 2)
    base_bytes: int               # unquantized base weights
    quant: Optional[str]          # None | "4bit" | "8bit"
    bf16: bool                    # mixed precision (autocast, or DeepSpeed's bf16)
    checkpointing: bool
    lora_dropout: float
    num_experts: int
    lora_r: int
    routing: str
    mixture: str
    optimizer: str
    device: str = "cuda"          # "cpu": no CUDA allowance, CPU kernels' saved tensors

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def planned_moe(cfg):
    """The mixture at its largest: a run that grows experts on novel data
    (train.grow_on_novelty) may reach train.max_experts."""
    moe, train = cfg.moe, cfg.train
    if getattr(train, "grow_on_novelty", False) and getattr(train, "max_experts", 0) > moe.num_experts:
        return dataclasses.replace(moe, num_experts=train.max_experts)
    return moe


def step_of(cfg, batch: Optional[int] = None, device: str = "cuda") -> Step:
    import torch

    from .train.build import base_dtype

    base_bytes = 2 if base_dtype(cfg) == torch.bfloat16 else 4
    quant = "4bit" if cfg.model.load_in_4bit else "8bit" if cfg.model.load_in_8bit else None
    return Step(batch=batch or cfg.train.train_batch_size, seq=cfg.data.max_seq_length,
                act_bytes=2 if (cfg.train.bf16 or base_bytes == 2 or quant) else 4, base_bytes=base_bytes,
                quant=quant, bf16=cfg.train.bf16, checkpointing=cfg.model.gradient_checkpointing,
                lora_dropout=cfg.moe.lora_dropout, num_experts=planned_moe(cfg).num_experts, lora_r=cfg.moe.lora_r,
                routing=cfg.moe.routing, mixture=cfg.moe.mixture, optimizer=cfg.train.optimizer, device=device)


# ---------------------------------------------------------------------------- estimate
@dataclass
class Component:
    key: str
    label: str
    bytes: float
    where: str = "gpu"            # "gpu" | "cpu"
    in_peak: bool = True          # False: shown, but overlaps a larger one in time

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class Plan:
    strategy: Strategy
    components: list
    refused: Optional[str] = None  # why this config cannot run the recipe at all

    @property
    def peak_bytes(self) -> float:
        return sum(c.bytes for c in self.components if c.where == "gpu" and c.in_peak)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    @property
    def cpu_gib(self) -> float:
        return sum(c.bytes for c in self.components if c.where == "cpu") / GiB

    def component(self, key: str) -> Component:
        return next(c for c in self.components if c.key == key)


def estimate(shape: ModelShape, step: Step, strategy: Strategy) -> Plan:
    """Peak memory of one process during a training step, per component."""
    deepspeed = strategy.kind in ("zero2", "zero3")
    trainable = shape.expert_params + shape.router_params
    if strategy.sharded:
        from . import plan_sharding

        parts = plan_sharding.base_components(shape, step, strategy, base_weights(shape, step))
        parts += plan_sharding.expert_states(shape, trainable, step, strategy)
    else:
        parts = [base_weights(shape, step)]
        parts += expert_states(trainable, step, strategy)
    parts.append(Component("activations", activations_label(step), activation_bytes(shape, step)))
    # Accelerate's mixed precision (not DeepSpeed's) returns the model outputs in fp32,
    # so the logits the output holds through the backward are an fp32 copy.
    held = 4 if step.bf16 and not deepspeed else step.act_bytes
    loss, backward = loss_stage_bytes(shape, step, held), backward_stage_bytes(shape, step, held)
    # The loss's backward and the decoder layers' backward happen one after the other:
    # only the larger adds to the peak.
    parts.append(Component("logits", logits_label(shape, step), loss, in_peak=loss >= backward))
    parts.append(Component("backward", backward_label(step), backward, in_peak=backward > loss))
    if step.device == "cuda":
        parts.append(Component("cuda", "CUDA context + workspaces (fixed allowance)", CUDA_ALLOWANCE_GIB * GiB))
    return Plan(strategy, parts, refusal(step, strategy))


def refusal(step: Step, strategy: Strategy) -> Optional[str]:
    """Why the loop would refuse this recipe under this config (as build.py and
    train/sharding.py do), or None."""
    if strategy.kind in ("zero2", "zero3") and step.optimizer != "adamw":
        return f"train.optimizer={step.optimizer!r} cannot run under DeepSpeed (use adamw)"
    if strategy.sharded and step.optimizer != "adamw":
        return f"train.optimizer={step.optimizer!r} cannot run under FSDP2 (use adamw)"
    if strategy.sharded and step.quant == "8bit":
        return f"model.load_in_8bit cannot be sharded under {strategy.kind} (use load_in_4bit)"
    return None


def base_weights(shape: ModelShape, step: Step) -> Component:
    """The frozen base. bitsandbytes quantizes the Linear weights (not the LM head, not
    embeddings or norms): NF4 is 4 bits a weight plus, with double quantization, an
    8-bit absmax per 64 weights and an fp32 one per 256 of those; LLM.int8 is a byte a
    weight plus an fp32 scale per output row (counted as nothing)."""
    other = shape.base_params - (shape.quantizable_params if step.quant else 0)
    dtype = "bfloat16" if step.base_bytes == 2 else "float32"
    if step.quant == "4bit":
        quantized, label = shape.quantizable_params * (0.5 + 1 / 64 + 4 / (64 * 256)), f"base weights (NF4 + {dtype})"
    elif step.quant == "8bit":
        quantized, label = shape.quantizable_params * 1.0, f"base weights (int8 + {dtype})"
    else:
        quantized, label = 0, f"base weights ({dtype})"
    return Component("base", label, other * step.base_bytes + quantized + shape.base_buffer_bytes)


def expert_states(trainable: int, step: Step, strategy: Strategy) -> list[Component]:
    """Experts + router, their gradients and the optimizer states.

    Without ZeRO the experts stay fp32 (as PEFT's adapters; autocast keeps a bf16 copy of
    each for its matmuls), their fp32 gradients persist across the accumulation window,
    and AdamW keeps m and v in fp32 (8 bytes a parameter; bitsandbytes' 8-bit AdamW: 2).
    DDP adds its gradient buckets, a second copy of the gradients.

    ZeRO-2 casts the module to bf16 under bf16, keeps an fp32 master copy plus m and v
    (12 bytes a parameter) and an fp32 gradient partition (4 more), all split over the
    processes - on the CPU with offload - plus a bf16 gradient partition and the reduce
    buckets (reduce_bucket_size elements, twice with overlap_comm) on the GPU, which
    DeepSpeed allocates whatever the model's size."""
    world = max(1, strategy.processes)
    if strategy.kind != "zero2":
        copies = 2 if step.bf16 else 0
        grads = trainable * 4 * (2 if strategy.kind == "ddp" else 1)
        moments = 2 if step.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
        return [Component("experts", "experts + router (fp32" + (", + bf16 autocast copies)" if copies else ")"),
                          trainable * (4 + copies)),
                Component("gradients", "expert gradients (fp32" + (", + DDP buckets)" if strategy.kind == "ddp" else ")"),
                          grads),
                Component("optimizer", f"optimizer states ({step.optimizer}: {moments} B/param)", trainable * moments)]
    param_bytes = 2 if step.bf16 else 4
    where = "cpu" if strategy.offload else "gpu"
    return [Component("experts", f"experts + router ({'bf16' if step.bf16 else 'fp32'}, cast by DeepSpeed)",
                      trainable * param_bytes),
            Component("gradients", f"expert gradient partition ({'bf16' if step.bf16 else 'fp32'}, 1/{world})",
                      trainable * param_bytes / world),
            Component("buckets", f"ZeRO reduce buckets ({strategy.buckets} x {strategy.bucket_elements:.0e} elements)",
                      strategy.buckets * strategy.bucket_elements * param_bytes),
            Component("optimizer", f"optimizer: fp32 master + m + v + fp32 grads (1/{world})"
                      + (", on the CPU" if strategy.offload else ""), trainable * 16 / world, where=where)]


def layer_activation_bytes(shape: ModelShape, step: Step) -> float:
    """What one decoder layer saves for backward with a frozen base.

    A frozen Linear saves nothing (its input is only needed for its own weight's
    gradient); everything else the backward has to go through keeps its inputs:
    - each norm: RMSNorms keep their fp32 upcast input, LayerNorm its input;
    - attention (SDPA / flash): q, k, v and the output, the fp32 log-sum-exp per head
      and token, and the padding mask turned into an additive bias (batch x T x T in
      the activation dtype, made anew in every layer). k and v are repeated to every
      query head for grouped KV when a padding mask is passed (what training does),
      a copy unless there is a single KV head (then the repeat is a view). Eager
      attention also keeps the fp32 softmax and its cast copy, heads x T x T per row;
    - MLP: the activation's input (several tensors for activations written in Python),
      and for a gated MLP the activation's output and the up projection (their product
      needs both);
    - LLM.int8 base Linears keep their input (bitsandbytes' backward dequantizes);
    - our stacked experts, per target: the input x (a copy of its own under dropout or a
      dtype cast) and dropout's mask (1 byte on CUDA; the CPU kernel keeps a mask in the
      activation dtype), and x@A and (x@A)*g, E*r wide each.
    """
    n, s, b, t = step.tokens, step.act_bytes, step.batch, step.seq
    total = sum(n * (w if w > 0 else shape.q_width) * (4 if fp32 else s) for w, fp32 in shape.layer_norms)
    repeated = 1 < shape.kv_heads < shape.num_heads and not shape.attention.startswith("flash_attention")
    kv = shape.q_width if repeated else shape.kv_width
    total += n * (2 * shape.q_width + 2 * kv) * s + b * shape.num_heads * t * 4 + b * t * t * s
    if shape.attention == "eager":
        total += b * shape.num_heads * t * t * (4 + (s if s != 4 else 0))
    total += n * shape.intermediate * s * (shape.activation_saves + (2 if shape.gated_mlp else 0))
    lora_bytes = 2 if step.bf16 else 4
    mask_bytes = 0 if step.lora_dropout == 0 else 1 if step.device == "cuda" else lora_bytes
    own_copy = step.lora_dropout > 0 or step.bf16 or lora_bytes != s
    shared = {l.input_key: l.in_features for l in shape.layer_linears if step.quant == "8bit"}
    for target in shape.layer_targets:
        if own_copy:
            total += n * target.in_features * (lora_bytes + mask_bytes)
        else:
            shared[target.input_key] = target.in_features
        total += 2 * n * step.num_experts * step.lora_r * lora_bytes
    total += sum(n * width * s for width in shared.values())
    return total


def activation_bytes(shape: ModelShape, step: Step) -> float:
    """Saved for backward over the whole model at the end of the forward. With
    checkpointing each layer keeps only its input (the backward recomputes one layer at
    a time: see backward_stage_bytes). Token routing keeps the per-token gates (shared
    by every layer) and the router's normalised input."""
    n, s = step.tokens, step.act_bytes
    if step.checkpointing:
        total = shape.num_layers * n * shape.hidden * s
    else:
        total = shape.num_layers * layer_activation_bytes(shape, step)
    if step.mixture == "logits":  # the reference mode runs the base once per expert
        total *= step.num_experts
    if shape.final_norm:
        total += n * shape.hidden * (4 if shape.final_norm[1] else s)
    if step.routing == "token":
        total += n * step.num_experts * step.lora_r * s + n * shape.hidden * 4
    return total


def loss_stage_bytes(shape: ModelShape, step: Step, held_bytes: int) -> float:
    """The LM head and the loss, at their peak (the start of the backward).

    Plain loss: the logits (T x V, kept by the model output through the whole backward:
    `held_bytes` a logit), the fp32 log-probs cross_entropy saves, and in backward the
    gradients of the log-probs and of the logits, both fp32: held + 12 bytes a logit.
    Chunked loss (model/loss.py): one chunk's logits at a time, in the forward, which
    also computes their gradient: the matmul's output, its fp32 copy and the gradient
    cast back for the next matmul (one fp32 tensor in fp32, 4 bytes a logit; 6 in bf16),
    plus the labelled positions' hidden states and their gradient, kept for the
    backward. Every position is counted as labelled
    (prompts are not): an upper bound. The reference mode (mixture=logits) keeps
    each expert pass's fp32 logits and their mixture as well."""
    n, v, s = step.batch * (step.seq - 1), shape.vocab, step.act_bytes
    if step.mixture == "logits":
        return n * v * (4 * step.num_experts + 4 + 12)
    if shape.loss_chunk_tokens:
        per_logit = 4 if s == 4 else 4 + s
        return min(shape.loss_chunk_tokens, n) * v * per_logit + 2 * n * shape.hidden * s
    return n * v * (held_bytes + 12)


def backward_stage_bytes(shape: ModelShape, step: Step, held_bytes: int) -> float:
    """A decoder layer's backward, beyond what the forward saved: the gradients flowing
    through its MLP (two tensors of the MLP width) and residual stream (two of the
    hidden width); the plain loss's logits, still held by the model output; with
    checkpointing, the layer's own saved set, recomputed; and a 4-bit base's
    dequantized weight (bitsandbytes dequantizes one Linear at a time)."""
    n, s = step.tokens, step.act_bytes
    work = n * (2 * shape.intermediate + 2 * shape.hidden) * s
    if not shape.loss_chunk_tokens:
        work += step.batch * step.seq * shape.vocab * held_bytes
    if step.checkpointing:
        work += layer_activation_bytes(shape, step)
    if step.quant == "4bit":
        work += shape.largest_linear * 2
    return work


def activations_label(step: Step) -> str:
    return "activations saved for backward" + (" (checkpointed)" if step.checkpointing else "")


def backward_label(step: Step) -> str:
    return "layer backward" + (" (one layer recomputed)" if step.checkpointing else " working set")


def logits_label(shape: ModelShape, step: Step) -> str:
    if step.mixture == "logits":
        return f"logits + loss (mixture=logits, {step.num_experts} passes)"
    if shape.loss_chunk_tokens:
        return f"logits + loss (chunked, {shape.loss_chunk_tokens} tokens/chunk)"
    return "logits + loss (plain: logits, fp32 log-probs + grads)"


def measured_cpu_peak(fn) -> int:
    """Peak bytes of torch's CPU allocations while fn runs, from the profiler's memory
    events (every allocation and free, in time order); tracemalloc does not see torch.
    What the estimates are checked against on CPU (tests/test_plan.py, bench/)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------------------- fit
@dataclass
class Fit:
    gpu: str
    strategy: str
    fits: Optional[bool]          # None: the config refuses the recipe
    headroom_gib: float
    max_micro_batch: int          # 0 = not even 1 fits
    note: str = ""


def gpu_total_gib(gpu: str) -> float:
    return GPUS[gpu] * 2**20 / GiB


def fit(shape: ModelShape, step: Step, strategy: Strategy, gpu: str) -> Fit:
    plan = estimate(shape, step, strategy)
    total = gpu_total_gib(gpu)
    if plan.refused:
        return Fit(gpu, strategy.name, None, 0.0, 0, plan.refused)
    return Fit(gpu, strategy.name, plan.peak_gib <= total, total - plan.peak_gib,
               max_micro_batch(shape, step, strategy, total))


def max_micro_batch(shape: ModelShape, step: Step, strategy: Strategy, total_gib: float, limit: int = 4096) -> int:
    """The largest train_batch_size whose peak fits (activations grow with the batch)."""
    best, b = 0, 1
    while b <= limit and estimate(shape, dataclasses.replace(step, batch=b), strategy).peak_gib <= total_gib:
        best, b = b, b * 2
    lo, hi = best, min(b, limit + 1)  # best fits, hi does not (or is past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = estimate(shape, dataclasses.replace(step, batch=mid), strategy).peak_gib <= total_gib
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo


# ---------------------------------------------------------------------------- entry points
@dataclass
class Report:
    recipe: str
    shape: ModelShape
    step: Step
    plans: list
    fits: list

    def to_dict(self) -> dict:
        shape = {k: v for k, v in dataclasses.asdict(self.shape).items()
                 if k not in ("layer_linears", "layer_targets", "layer_norms", "final_norm")}
        return {
            "recipe": self.recipe,
            "model": shape,
            "step": {**dataclasses.asdict(self.step), "tokens": self.step.tokens},
            "cuda_allowance_gib": CUDA_ALLOWANCE_GIB,
            "configs": {p.strategy.name: {
                "processes": p.strategy.processes, "offload": p.strategy.offload, "refused": p.refused,
                "gpu_peak_gib": round(p.peak_gib, 3), "cpu_gib": round(p.cpu_gib, 3),
                "components": {c.key: {"label": c.label, "gib": round(c.gib, 3), "where": c.where,
                                       "in_peak": c.in_peak} for c in p.components}} for p in self.plans},
            "gpus": {g: {"total_gib": round(gpu_total_gib(g), 2), "recommended": recommended(self, g), "configs": {
                f.strategy: {"fits": f.fits, "headroom_gib": round(f.headroom_gib, 2),
                             "max_micro_batch": f.max_micro_batch, "note": f.note}
                for f in self.fits if f.gpu == g}} for g in dict.fromkeys(f.gpu for f in self.fits)},
        }


def recommended(report: Report, gpu: str) -> Optional[str]:
    """The first config in SHIPPED order (least communication first) whose step fits,
    using every process asked for (no single-GPU config when there are several)."""
    fitting = {f.strategy for f in report.fits if f.gpu == gpu and f.fits and f.max_micro_batch >= report.step.batch}
    world = world_size(report)
    return next((p.strategy.name for p in report.plans if p.strategy.name in fitting
                 and (p.strategy.processes == world or world == 1)), None)


def world_size(report: Report) -> int:
    return max((p.strategy.processes for p in report.plans), default=1)


def plan_recipe(cfg, recipe: str = "", processes: int = 1, gpus=None, strategies=None) -> Report:
    """The whole report for a loaded recipe (RunConfig)."""
    hf_config, source = resolve_base_config(cfg.model)
    shape = model_shape(hf_config, planned_moe(cfg), cfg.model.base_model, source, cfg.model.attn_implementation)
    step = step_of(cfg)
    strategies = strategies or shipped_strategies(processes)
    plans = [estimate(shape, step, s) for s in strategies]
    fits = [fit(shape, step, s, g) for g in (gpus or list(GPUS)) for s in strategies]
    return Report(recipe, shape, step, plans, fits)


def strategy_named(name: str, processes: int = 1) -> Strategy:
    return next(s for s in shipped_strategies(processes) if s.name == name)


def fit_warning(cfg, gpu_total_bytes: float, gpu_name: str, strategy: Strategy) -> Optional[str]:
    """One line when the recipe's plan does not fit the GPU under `strategy`, else None."""
    hf_config, source = resolve_base_config(cfg.model)
    shape = model_shape(hf_config, planned_moe(cfg), cfg.model.base_model, source, cfg.model.attn_implementation)
    step = step_of(cfg)
    plan = estimate(shape, step, strategy)
    total = gpu_total_bytes / GiB
    if plan.peak_gib <= total:
        return None
    top = sorted((c for c in plan.components if c.in_peak and c.where == "gpu"), key=lambda c: -c.bytes)[:3]
    best = max_micro_batch(shape, step, strategy, total)
    return (f"memory plan: {plan.peak_gib:.1f} GiB peak per GPU under {strategy.name} > {total:.1f} GiB of "
            f"{gpu_name} (largest: " + ", ".join(f"{c.label} {c.gib:.1f} GiB" for c in top) + "); "
            + (f"--train_batch_size {best} would fit" if best else "no micro-batch fits")
            + " (details: dylora-moe plan --config RECIPE)")


def resolve_gpu(name: str) -> str:
    wanted = name.upper().replace("_", "-")
    matches = [g for g in GPUS if g.upper() == wanted or g.upper().startswith(wanted + "-")]
    if len(matches) != 1:
        raise ValueError(f"--gpu={name!r}: expected one of {list(GPUS)}")
    return matches[0]


def format_report(report: Report) -> str:
    shape, step = report.shape, report.step
    lines = [f"memory plan for {report.recipe or 'the recipe'}",
             f"  base      {shape.base_model}: {shape.base_params / 1e9:.2f} B parameters, {shape.num_layers} layers, "
             f"hidden {shape.hidden}, MLP {shape.intermediate}, vocab {shape.vocab} (shape from {shape.source})",
             f"  experts   {step.num_experts} x r{step.lora_r} on {len(shape.layer_targets)} Linears a layer "
             f"({', '.join(t.name.rsplit('.', 1)[-1] for t in shape.layer_targets)}): "
             f"{shape.expert_params / 1e6:.2f} M + router {shape.router_params / 1e3:.1f} k parameters",
             f"  step      micro-batch {step.batch} x {step.seq} tokens, "
             f"{'bf16' if step.bf16 else 'fp32'}{', base ' + step.quant if step.quant else ''}, "
             f"checkpointing {'on' if step.checkpointing else 'off'}, "
             f"loss {'chunked ' + str(shape.loss_chunk_tokens) if shape.loss_chunk_tokens else 'plain'}, "
             f"optimizer {step.optimizer}, {world_size(report)} process(es) for DDP, ZeRO and FSDP", ""]
    names = [p.strategy.name for p in report.plans]
    width, col = 48, 15
    lines.append("GiB per GPU process".ljust(width) + "".join(f"{n:>{col}}" for n in names))
    order = ["base", "gathered", "experts", "gradients", "optimizer", "buckets", "activations", "logits", "backward",
             "cuda"]
    keys = sorted(dict.fromkeys(c.key for p in report.plans for c in p.components), key=order.index)
    for key in keys:
        row = [next((c for c in p.components if c.key == key), None) for p in report.plans]
        labels = {c.label for c in row if c is not None}
        label = labels.pop() if len(labels) == 1 else ROW_NAMES.get(key, key)
        cells = []
        for c in row:
            if c is None:
                cells.append("-")
            elif c.where == "cpu":
                cells.append(f"(CPU {c.gib:.2f})")
            else:
                cells.append(f"{c.gib:.2f}" + ("" if c.in_peak else "*"))
        lines.append(f"  {label}".ljust(width) + "".join(f"{x:>{col}}" for x in cells))
    lines.append("  peak".ljust(width) + "".join(f"{p.peak_gib:>{col}.2f}" for p in report.plans))
    lines.append("  CPU (offloaded)".ljust(width) + "".join(f"{p.cpu_gib:>{col}.2f}" for p in report.plans))
    lines += ["  * overlaps a larger stage in time: shown, not in the peak", ""]
    lines.append("fits? (headroom GiB, largest micro-batch)".ljust(width) + "".join(f"{n:>{col}}" for n in names))
    for gpu in dict.fromkeys(f.gpu for f in report.fits):
        cells = []
        for f in (f for f in report.fits if f.gpu == gpu):
            if f.fits is None:
                cells.append("refused")
            else:
                cells.append(f"{'yes' if f.fits else 'NO'} {f.headroom_gib:+.1f} b{f.max_micro_batch}")
        lines.append(f"  {gpu} ({gpu_total_gib(gpu):.1f} GiB)".ljust(width) + "".join(f"{x:>{col}}" for x in cells))
    lines.append("")
    for gpu in dict.fromkeys(f.gpu for f in report.fits):
        best = recommended(report, gpu)
        processes = next((p.strategy.processes for p in report.plans if p.strategy.name == best), 1)
        lines.append(f"  {gpu}: " + (f"use {best} ({processes} process(es))" if best else
                                     "nothing fits; more processes (--num_processes), load_in_4bit, "
                                     "gradient_checkpointing or a smaller micro-batch"))
    refused = {p.strategy.name: p.refused for p in report.plans if p.refused}
    lines += [f"  refused: {n}: {why}" for n, why in refused.items()]
    lines.append("  multi_node_zero2 is zero2_offload per GPU. zero3/fsdp2 split the base over the processes.")
    lines.append("  An estimate: keep a few GiB of headroom. Upper bounds:")
    lines.append("  every row padded to max_seq_length, every position labelled (the chunked loss skips prompts).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dylora-moe plan", description="Estimate the peak GPU memory of a recipe and which GPU / accelerate "
                                            "config it fits, before launching it.",
        epilog="Any recipe field can be overridden as in `dylora-moe train`: --num_experts 8 --load_in_4bit "
               "--train_batch_size 4 --gradient_checkpointing.")
    parser.add_argument("--config", help="recipe YAML (configs/codegemma-2b.yaml, ...)")
    parser.add_argument("--gpu", action="append", help=f"only these GPUs: {', '.join(GPUS)} (repeatable)")
    parser.add_argument("--num_processes", type=int, default=1, help="world size ZeRO shards the optimizer over")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    from .train.config import load_recipe

    try:
        if args.num_processes < 1:
            raise ValueError(f"--num_processes={args.num_processes}: expected an integer >= 1")
        gpus = [resolve_gpu(g) for g in args.gpu] if args.gpu else None
        cfg = load_recipe(args.config, overrides, require_base=True)
        report = plan_recipe(cfg, args.config or "", args.num_processes, gpus)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    from .errors import guarded

    sys.exit(guarded(main, sys.argv[1:]))
