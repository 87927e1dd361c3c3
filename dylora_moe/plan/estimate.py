"""The peak memory of one training step under one accelerate config, component by
component. Why each formula is what it is sits next to it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from . import sharded
from .component import GiB, Component
from .setup import Step, Strategy
from .shape import ModelShape

# Fixed per-process allowance on a GPU, beyond the tensors torch allocates: the CUDA
# context with torch's kernels (0.75 GiB measured on an H200: device use minus what
# torch reserved), cuBLAS/NCCL workspaces and the caching allocator's fragmentation
# (it held 1-4 GiB more than the allocated peak in the same runs).
CUDA_ALLOWANCE_GIB = 2.0
# Table rows whose detail differs between configs get these names (the JSON keeps it).
ROW_NAMES = {"experts": "experts + router", "gradients": "expert gradients", "optimizer": "optimizer states",
             "buckets": "ZeRO reduce buckets", "base": "base weights", "gathered": "gathered whole (sharded base)"}


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

        parts = sharded.base_components(shape, step, strategy, base_weights(shape, step))
        parts += sharded.expert_states(shape, trainable, step, strategy)
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
    (prompts are not): an upper bound."""
    n, v, s = step.batch * (step.seq - 1), shape.vocab, step.act_bytes
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
    if shape.loss_chunk_tokens:
        return f"logits + loss (chunked, {shape.loss_chunk_tokens} tokens/chunk)"
    return "logits + loss (plain: logits, fp32 log-probs + grads)"


def measured_cpu_peak(fn) -> int:
    """Peak bytes of torch's CPU allocations while fn runs, from the profiler's memory
    events (every allocation and free, in time order); tracemalloc does not see torch.
    What the estimates are checked against on CPU (tests/test_plan.py, bench/)."""

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak
