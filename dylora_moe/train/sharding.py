"""Sharded bases: DeepSpeed ZeRO-3 and FSDP2, where each process holds 1/N of the frozen base.

The model code does not know it is sharded; what changes is handled here, from the
training side:
- transformers builds every model inside `deepspeed.zero.Init` once a ZeRO-3 config is
  registered (Accelerate registers it for any stage-3 config, whatever
  `zero3_init_flag` says). Each parameter is then broadcast and partitioned as it is
  created: a collective. The tiny random base that the main process builds and saves
  for the others would wait forever for them (rank 0 in zero.Init's broadcast, rank 1 in
  the barrier after it), so it is built outside (`built_by_this_process_alone`). Every
  rank then loads the saved base, under zero.Init, partitioned as it loads.
- Outside a forward, a partitioned parameter holds only this rank's piece (ZeRO-3: an
  empty tensor, FSDP2: a DTensor shard). Whatever reads or writes experts and router
  there (the portable export, the finite-weights check, the final checksum, frozen
  experts written back, growth) goes through `full_experts`, `full_value` and
  `write_full`, which gather and scatter with the backends' own APIs.
- The chunked loss multiplies by the LM head's weight inside DyLoRAMoE.forward, not in
  the head's own forward. ZeRO-3 only gathers a parameter for the forward of the module
  that owns it, so the weight is registered as an external parameter of the mixture
  (`prepare_model`).
- Accelerate turns FSDP on only for GPU-like devices: on CPU it picks distributed type
  NO (every process trains alone) or, started on the CPU, MULTI_CPU (DDP).
  `enable_fsdp_on_cpu` switches Accelerate's own FSDP2 path on over gloo (torch's
  fully_shard runs there), so the same code is tested on CPU as runs on GPUs.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, convert_outputs_to_fp32, gather_object
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

from ..errors import UserError

logger = logging.getLogger(__name__)

ZERO3, FSDP2 = "zero3", "fsdp2"


# ---------------------------------------------------------------------------- which backend
def kind(accelerator) -> str:
    """"zero3", "fsdp2" or "" (nothing of the base is partitioned)."""
    state = accelerator.state
    if accelerator.distributed_type.value == "DEEPSPEED":
        return ZERO3 if state.deepspeed_plugin.zero_stage == 3 else ""
    if accelerator.distributed_type.value == "FSDP":
        return FSDP2 if getattr(state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp1"
    return ""


def zero3_enabled() -> bool:
    """True while a ZeRO-3 DeepSpeed config is registered with transformers."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def fsdp_requested(env=None) -> bool:
    """The accelerate config asks for FSDP (accelerate launch sets this from the yaml)."""
    env = os.environ if env is None else env
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """On a CPU-only machine, make an FSDP accelerate config run as FSDP (over gloo)
    instead of as N unsynchronised copies. True when it switched FSDP on."""
    if not fsdp_requested() or accelerator.distributed_type == DistributedType.FSDP:
        return False
    if torch.cuda.is_available() or accelerator.num_processes < 2:
        return False
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise UserError("accelerate config: distributed_type FSDP on a machine without a GPU needs the processes "
                        "started on the CPU (ACCELERATE_USE_CPU=true accelerate launch ...); Accelerate would "
                        "otherwise start each process alone")
    plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables accelerate launch set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)

    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # What AcceleratorState's own init does last: every later AcceleratorState() copies it back.
    PartialState().distributed_type = DistributedType.FSDP
    return True


# ---------------------------------------------------------------------------- checks
def check_supported(cfg, backend: str) -> None:
    """What a sharded base cannot do, refused in one line before any model is loaded."""
    if backend == "fsdp1":
        raise UserError("accelerate config: fsdp_version 1 is not supported (the frozen base and the trainable "
                        "experts share FSDP1's flat parameters); set fsdp_version: 2, see "
                        "accelerate_configs/fsdp2.yaml")
    if backend in (ZERO3, FSDP2) and cfg.model.load_in_8bit:
        raise UserError(f"model.load_in_8bit cannot be sharded under {backend} (LLM.int8 keeps each weight's row "
                        "scales beside it, which a flat split of the weight loses); use model.load_in_4bit, "
                        "or a replicated config (zero2_offload, multi_gpu)")
    if backend != FSDP2:
        return
    if cfg.train.optimizer != "adamw":
        # bitsandbytes' update kernel takes plain tensors; FSDP2's parameters are DTensors
        # ("got mixed torch.Tensor and DTensor" at the first step, measured).
        raise UserError(f"train.optimizer={cfg.train.optimizer!r} cannot run under FSDP2 (bitsandbytes' 8-bit "
                        "update does not take FSDP2's DTensor parameters); use adamw, whose states FSDP2 shards")
    if cfg.train.grow_on_novelty:
        raise UserError("train.grow_on_novelty cannot run under FSDP2 (the experts are DTensor shards inside "
                        "the base's FSDP units and cannot be widened in place); use accelerate_configs/zero3.yaml")


def check_growth(backend: str, add: int) -> None:
    if backend == FSDP2 and add:
        raise UserError(f"moe.num_experts: a resume that adds {add} expert(s) cannot run under FSDP2 (the experts "
                        "are DTensor shards inside the base's FSDP units and cannot be widened in place); resume "
                        "with the checkpoint's count, or grow under accelerate_configs/zero3.yaml")


# ---------------------------------------------------------------------------- building
@contextlib.contextmanager
def built_by_this_process_alone(accelerator):
    """Build a model on one process without `zero.Init` (no collective per parameter)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not zero3_enabled():
        yield
        return

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def prepare_model(moe, accelerator, backend: str) -> None:
    """What the backend needs to know about the mixture before accelerator.prepare."""
    if backend == ZERO3:
        head = moe.base_model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            from deepspeed.runtime.zero import register_external_parameter

            register_external_parameter(moe, head.weight)
    if backend == FSDP2:
        plugin = accelerator.state.fsdp_plugin
        if not plugin.transformer_cls_names_to_wrap:
            # One FSDP unit per decoder block (only one block's base is ever whole), not
            # the whole mixture as a single unit: DyLoRAMoE names no block classes itself.
            plugin.transformer_cls_names_to_wrap = list(getattr(moe.base_model, "_no_split_modules", None) or [])
        if not plugin.transformer_cls_names_to_wrap:
            raise UserError(f"accelerate config: fsdp_transformer_layer_cls_to_wrap is not set and "
                            f"{type(moe.base_model).__name__} names no decoder block class; set it in the yaml")
        if accelerator.mixed_precision != "no":
            # Mixed precision as under every other config: autocast (after_prepare), the
            # parameters in their own dtype (fp32 experts, the base as loaded), gradients
            # reduced in fp32. FSDP2's own cast of the parameters to bf16 would leave the
            # gates, computed in the mixture's forward from a still-sharded fp32 expert,
            # in fp32 against bf16 experts ("expected m1 and m2 to have the same dtype",
            # measured), and Accelerate adds no autocast under FSDP2.
            from torch.distributed.fsdp import MixedPrecisionPolicy

            plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)


def after_prepare(model, accelerator, backend: str) -> None:
    """FSDP2 with mixed precision: the forward under autocast, outputs in fp32, as
    Accelerate wraps it for single-GPU, DDP and DeepSpeed runs."""
    if backend != FSDP2 or accelerator.mixed_precision not in ("bf16", "fp16"):
        return

    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
    forward = model.forward
    model.forward = convert_outputs_to_fp32(torch.autocast(device_type=accelerator.device.type, dtype=dtype)(forward))


# ---------------------------------------------------------------------------- full values
def is_dtensor(t) -> bool:
    """Whether a tensor is an FSDP2 shard (a DTensor): its gradient and value need gathering."""
    return isinstance(t, DTensor)


def full_value(param: torch.Tensor) -> torch.Tensor:
    """A detached copy of a parameter's whole value, on every rank (a collective under
    ZeRO-3 and FSDP2: every rank calls it). Under ZeRO-3 the fp32 master copy."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is None:
            raise TypeError("full_value: a ZeRO-3 parameter without a master copy (frozen); only experts and router")
        return value.detach().clone()
    if is_dtensor(param):
        return param.detach().full_tensor().clone()
    return param.detach().clone()


@torch.no_grad()
def write_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set a (possibly partitioned) trainable parameter to `value` on every rank, the
    optimizer's master copy included (a collective under ZeRO-3 and FSDP2)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_full_fp32_param

        _write_zero3_module_copy(param, value)
        safe_set_full_fp32_param(param, value.to(param.device, torch.float32))
        return
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
        param.to_local().copy_(shard.to_local())
        return
    raise TypeError("write_full: not a partitioned parameter (ZeRO-3 or FSDP2)")


def _write_zero3_module_copy(param, value: torch.Tensor) -> None:
    """The module's copy of a ZeRO-3 parameter: its partition, and its whole tensor where
    DeepSpeed keeps one (persistent parameters). Those are written in place: gathering
    them would end in a partition call that frees them, which DeepSpeed's record of the
    module order does not expect (it fails the next backward with a "tracing error")."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.AVAILABLE:
        with GatheredParameters([param], modifier_rank=0):  # rank 0's value is scattered on exit
            param.data.copy_(value.to(param.device, param.dtype).view_as(param.data))
        return
    param.data.copy_(value.to(param.device, param.dtype).view_as(param.data))
    part = param.ds_tensor
    start = torch.distributed.get_rank(group=param.ds_process_group) * part.numel()  # DeepSpeed's layout
    chunk = value.reshape(-1)[start:start + part.numel()]
    part.data[: chunk.numel()].copy_(chunk.to(part.device, part.dtype))


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") or is_dtensor(param)


def full_grad(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The whole reduced gradient of a parameter (FSDP2: its DTensor shards gathered)."""
    grad = param.grad
    if grad is not None and is_dtensor(grad):
        return grad.full_tensor()
    return grad


@contextlib.contextmanager
def full_experts(accelerator, moe):
    """Every rank sees the experts' and router's whole tensors, for reading (the export,
    checks, checksums); a no-op without a partitioned base. All ranks enter it."""
    backend = kind(accelerator)
    params = moe.trainable_parameters()
    if backend == ZERO3:
        from deepspeed.runtime.zero import GatheredParameters
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # Only what is not whole already: the context frees what it gathered on exit, and
        # freeing a parameter DeepSpeed keeps whole breaks its record of the module order.
        missing = [p for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
        with GatheredParameters(missing, enabled=bool(missing)):
            yield
        return
    if backend == FSDP2:
        with _fsdp2_whole(moe):
            yield
        return
    yield


@contextlib.contextmanager
def _fsdp2_whole(moe):
    """Swap each trainable DTensor shard for a plain parameter holding its whole value,
    and back (module order is the same on every rank, so the gathers line up)."""
    swapped = []
    try:
        for module in moe.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.requires_grad and is_dtensor(param):
                    module._parameters[name] = nn.Parameter(param.detach().full_tensor(), requires_grad=True)
                    swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


@contextlib.contextmanager
def generation(accelerator, model):
    """HF generate calls the base directly, not the mixture's forward. Under FSDP2 the
    mixture's own FSDP unit (router, and whatever of the base no block unit holds) is
    gathered only by that forward, so it is gathered by hand around generation."""
    if kind(accelerator) != FSDP2:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# ---------------------------------------------------------------------------- measured
def held_base_bytes(moe) -> tuple[int, int]:
    """(bytes of the frozen base this process holds, bytes of the whole base), as it
    trains: a ZeRO-3 partition (plus whole copies of the small parameters DeepSpeed
    keeps gathered: stage3_param_persistence_threshold), an FSDP2 shard, or everything.
    A 4-bit base counts its packed storage."""
    held = total = 0
    seen = set()
    for param in moe.base_model.parameters():
        if param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        size = param.element_size()
        if hasattr(param, "ds_id"):
            total += param.ds_numel * size
            held += (param.ds_tensor.numel() + (param.ds_numel if getattr(param, "ds_persist", False) else 0)) * size
        elif is_dtensor(param):
            total += param.numel() * size
            held += param.to_local().numel() * size
        else:
            total += param.numel() * size
            held += param.numel() * size
    return held, total


def trainable_elements(moe) -> int:
    """Experts + router, counted whole (a ZeRO-3 parameter's own numel is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in moe.trainable_parameters())


def sharding_record(accelerator, moe, backend: str) -> dict:
    """What metrics.jsonl records once per run: how much of the base each rank holds."""
    held, total = held_base_bytes(moe)
    per_rank = gather_object([held])
    # ZeRO-3 keeps parameters up to stage3_param_persistence_threshold whole on every rank.
    whole = all(getattr(p, "ds_persist", False) for p in moe.trainable_parameters())
    return {"step": 0, "sharding": {"backend": backend or "none", "base_bytes": total,
                                    "held_bytes_per_rank": per_rank,
                                    "fraction_per_rank": [h / max(total, 1) for h in per_rank],
                                    "experts_whole": whole}}
