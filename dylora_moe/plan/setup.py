"""How a recipe runs, as the plan sees it: the accelerate config (Strategy) and one
micro-batch (Step)."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..recipe import base_dtype

ROOT = Path(__file__).resolve().parents[2]  # the repo: accelerate_configs/, ds_configs/


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


def offloads_optimizer(zero_optimization: dict) -> bool:
    """A DeepSpeed `zero_optimization` section that puts the optimizer on the CPU: the
    one reading of it for the plan, the preflight check and the loop."""
    return (zero_optimization.get("offload_optimizer") or {}).get("device") == "cpu"


def apply_zero_settings(strategy: Strategy, ds_json: Path) -> Strategy:
    """Offload and gradient buckets from a DeepSpeed JSON (DeepSpeed's defaults where unset)."""
    shipped = {"offload_optimizer": {"device": "cpu"} if strategy.name.endswith("offload") else None,
               "reduce_bucket_size": 2e8, "overlap_comm": True, "contiguous_gradients": True}
    if strategy.name.startswith("zero3"):
        shipped.update(stage=3, reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7,
                       stage3_param_persistence_threshold=2e6,
                       offload_param={"device": "cpu"} if strategy.name.endswith("offload") else None)
    zero = json.loads(ds_json.read_text()).get("zero_optimization", {}) if ds_json.is_file() else shipped
    strategy.offload = offloads_optimizer(zero)
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


def strategy_named(name: str, processes: int = 1) -> Strategy:
    return next(s for s in shipped_strategies(processes) if s.name == name)



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
    base_bytes = 2 if base_dtype(cfg) == torch.bfloat16 else 4
    quant = "4bit" if cfg.model.load_in_4bit else "8bit" if cfg.model.load_in_8bit else None
    return Step(batch=batch or cfg.train.train_batch_size, seq=cfg.data.max_seq_length,
                act_bytes=2 if (cfg.train.bf16 or base_bytes == 2 or quant) else 4, base_bytes=base_bytes,
                quant=quant, bf16=cfg.train.bf16, checkpointing=cfg.model.gradient_checkpointing,
                lora_dropout=cfg.moe.lora_dropout, num_experts=planned_moe(cfg).num_experts, lora_r=cfg.moe.lora_r,
                routing=cfg.moe.routing, optimizer=cfg.train.optimizer, device=device)


# ---------------------------------------------------------------------------- estimate
