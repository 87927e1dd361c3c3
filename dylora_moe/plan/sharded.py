"""The memory plan's terms for a sharded base: DeepSpeed ZeRO-3 (with and without
parameter offload) and FSDP2. Used by plan.estimate; every formula says why.

Per process, a sharded base costs its partition (1/N of the base) plus what is gathered
whole at a time to compute with:
- ZeRO-3 gathers each module's parameters just before its forward (and backward) and
  frees them after, prefetching up to stage3_prefetch_bucket_size elements of what comes
  next. A parameter that will be used again within stage3_max_reuse_distance elements
  is not freed: at the turn from forward to backward the last blocks are used twice in a
  row, so they stay. Parameters of at most stage3_param_persistence_threshold elements
  (norms, biases, and with the shipped configs every expert) stay whole on every GPU.
  The chunked loss reads the LM head's weight inside the mixture's forward, where it is
  registered as an external parameter (train/sharding.py): whole for the whole forward.
- FSDP2 makes one unit per decoder block (gathered for its forward and its backward,
  the next one prefetched) and the mixture itself is the root unit: the embeddings, the
  final norm, an untied head and the router, gathered from the first forward to the end
  of the backward (the root is not resharded after forward).
"""
from __future__ import annotations

from .component import Component
from .setup import Step, Strategy
from .shape import ModelShape

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # estimate.base_weights: 4 bits, absmax per 64, fp32 per 256 of those


def block_bytes(shape: ModelShape, step: Step) -> float:
    """One decoder block's frozen base as it is stored (NF4 Linears with a 4-bit base)."""
    if step.quant == "4bit":
        return shape.block_quantizable * NF4_BYTES + (shape.block_params - shape.block_quantizable) * step.base_bytes
    if step.quant == "8bit":
        return shape.block_quantizable + (shape.block_params - shape.block_quantizable) * step.base_bytes
    return shape.block_params * step.base_bytes


def persistent_elements(sizes: list, strategy: Strategy) -> int:
    if strategy.kind != "zero3":
        return 0
    return sum(n for n in sizes if n <= strategy.persistence_threshold)


def base_components(shape: ModelShape, step: Step, strategy: Strategy, whole: Component) -> list[Component]:
    """The base's partition on this process, and what is gathered whole at a time."""
    world = max(1, strategy.processes)
    persistent = persistent_elements(shape.base_param_sizes, strategy) * step.base_bytes
    partition = (whole.bytes - persistent) / world
    where = "cpu" if strategy.offload_params else "gpu"
    label = whole.label.replace("base weights", f"base weights, 1/{world} partition")
    parts = [Component("base", label + (", on the CPU" if strategy.offload_params else ""), partition, where=where)]
    block = block_bytes(shape, step)
    if strategy.kind == "zero3":
        parts.append(Component("gathered", zero3_gathered_label(shape, strategy),
                               zero3_gathered(shape, step, strategy, block) + persistent))
    else:
        root = (shape.embedding_params + shape.head_params) * step.base_bytes
        parts.append(Component("gathered", "gathered: embeddings/head (the root unit) + 2 decoder blocks",
                               root + 2 * block))
    return parts


def zero3_gathered(shape: ModelShape, step: Step, strategy: Strategy, block: float) -> float:
    """The blocks held whole at the forward/backward turn, the prefetch bucket, and the
    LM head kept whole through the forward for the chunked loss; or, if larger, the
    embeddings while they are looked up."""
    per_element = block / max(shape.block_params, 1)
    held_blocks = 1 + int(strategy.reuse_distance // max(2 * shape.block_params, 1))
    held_blocks = max(1, min(held_blocks, shape.num_layers,
                             int(strategy.max_live // max(shape.block_params, 1)) or 1))
    prefetch = min(strategy.prefetch_elements, shape.block_params) * per_element
    head = (shape.head_params or shape.embedding_params) * step.base_bytes if shape.loss_chunk_tokens else 0
    return max(held_blocks * block + prefetch + head, shape.embedding_params * step.base_bytes + prefetch)


def zero3_gathered_label(shape: ModelShape, strategy: Strategy) -> str:
    held = 1 + int(strategy.reuse_distance // max(2 * shape.block_params, 1))
    held = max(1, min(held, shape.num_layers))
    head = " + the LM head (chunked loss)" if shape.loss_chunk_tokens else ""
    return f"gathered: {held} decoder block(s) + prefetch{head}"


def expert_states(shape: ModelShape, trainable: int, step: Step, strategy: Strategy) -> list[Component]:
    world = max(1, strategy.processes)
    if strategy.kind == "zero3":
        return zero3_expert_states(shape, trainable, step, strategy, world)
    # FSDP2: Accelerate keeps trainable parameters in fp32 (the mixed-precision policy
    # casts them for compute), sharded like the base; gradients and AdamW's m and v too.
    return [Component("experts", f"experts + router (fp32, 1/{world} shard)", trainable * 4 / world),
            Component("gradients", f"expert gradients (fp32, 1/{world} shard)", trainable * 4 / world),
            Component("optimizer", f"optimizer states ({step.optimizer}: 8 B/param, 1/{world} shard)",
                      trainable * 8 / world)]


def zero3_expert_states(shape: ModelShape, trainable: int, step: Step, strategy: Strategy,
                        world: int) -> list[Component]:
    """Experts at or under the persistence threshold stay whole (bf16 under bf16); the
    rest is a partition. One reduce bucket (ZeRO-3 keeps one per dtype), the gradient
    partition, and the fp32 master + m + v: on the CPU with optimizer offload."""
    param_bytes = 2 if step.bf16 else 4
    whole = persistent_elements(shape.expert_param_sizes, strategy)
    where = "cpu" if strategy.offload else "gpu"
    return [Component("experts", f"experts + router ({'bf16' if step.bf16 else 'fp32'}, whole on every GPU)",
                      (whole + (trainable - whole) / world) * param_bytes),
            Component("gradients", f"expert gradient partition (1/{world})", trainable * param_bytes / world,
                      where=where),
            Component("buckets", f"ZeRO reduce bucket (1 x {strategy.bucket_elements:.0e} elements)",
                      strategy.bucket_elements * param_bytes),
            Component("optimizer", f"optimizer: fp32 master + m + v (1/{world})"
                      + (", on the CPU" if strategy.offload else ""), trainable * 12 / world, where=where)]
