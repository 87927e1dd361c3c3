"""Growing the experts of a training run: on a resume with more experts
(`--num_experts 6 --resume_from_checkpoint X` on a 4-expert checkpoint), or when the
novelty trigger fires mid-run (train/novelty.py).

Both go the same way. The run is prepared as saved and, on a resume, restored exactly
(accelerator.load_state: weights, optimizer, schedule, RNG, counters). Then
`Grower.grow` takes the model out of DDP / DeepSpeed (accelerator.free_memory), adds
the experts (DyLoRAMoE.add_expert), builds a new optimizer and prepares again.

What growth carries:
- weights: every old expert and the router, exactly (under ZeRO from DeepSpeed's fp32
  master copy, not from a bf16 module copy); maturity counters and the novelty library
  (router buffers);
- optimizer: with torch AdamW, the old experts' and the router's moments (exp_avg,
  exp_avg_sq) and the step count; the new experts' moments start at 0 (AdamW counts steps
  per tensor, so theirs get no bias correction: early updates up to 6.6x a fresh Adam's,
  which a resume's restarted warmup tempers). Under DeepSpeed
  ZeRO the optimizer state is flattened and partitioned across ranks and is not
  reshaped: the grown model starts a fresh optimizer (every moment 0, step count 0).
  bitsandbytes' 8-bit state is quantised blockwise: also fresh. The log says which.

A resume with more experts is a new phase, not an exact resume (`start_phase`): the
global step continues (checkpoint names, metrics and `auto` stay ordered, and max_steps
stays the run's total), the LR schedule restarts with its warmup over the steps left
(a finished cosine would leave the new experts a learning rate of ~0), the data stream
starts from its beginning (it may be new data), and early stopping starts over. A growth
mid-run is not a new phase: schedule and data position go on.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..model import MoEConfig
from ..model.growth import expert_axes
from ..model.persistence import CONFIG_FILE
from . import build, sharding
from ..checkpoint import read_marker
from .maturity import full_fp32

logger = logging.getLogger(__name__)


def saved_moe_config(checkpoint) -> MoEConfig:
    """The mixture a checkpoint holds (its portable copy's config)."""
    path = Path(checkpoint) / "portable" / "experts" / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"train.resume_from_checkpoint={str(checkpoint)!r}: {path} is missing; expected a "
                        "checkpoint written by dylora-moe train")
    return MoEConfig.load(path)


def plan_resume(cfg, checkpoint) -> tuple[MoEConfig, int]:
    """(the recipe's mixture config with the checkpoint's expert count, so the model is
    built as saved and restores exactly; how many experts to add afterwards to reach the
    recipe's num_experts). A run grown by novelty keeps its experts when the recipe asks
    fewer."""
    saved = saved_moe_config(checkpoint)
    requested, have = cfg.moe.num_experts, saved.num_experts
    if requested < have:
        logger.info("checkpoint %s holds %d experts, the recipe asks for %d: keeping %d (to remove experts use "
                    "dylora-moe prune)", checkpoint, have, requested, have)
    history = {"expert_history": saved.extra["expert_history"]} if "expert_history" in saved.extra else {}
    as_saved = dataclasses.replace(cfg.moe, num_experts=have, extra={**cfg.moe.extra, **history})
    add = max(0, requested - have)
    step = (read_marker(checkpoint) or {}).get("step", 0)
    if add and cfg.train.max_steps and cfg.train.max_steps <= step:
        raise UserError(f"train.max_steps={cfg.train.max_steps}: the checkpoint is at step {step}; a resume with more "
                        "experts trains up to max_steps (the run's total), so raise it")
    return as_saved, add


class Grower:
    """Adds experts to a prepared run; see the module docstring for what is carried."""

    def __init__(self, cfg, accelerator, deepspeed: bool, cpu_offload: bool):
        self.cfg, self.accelerator, self.deepspeed, self.cpu_offload = cfg, accelerator, deepspeed, cpu_offload

    def grow(self, model, raw_optimizer, count: int, note: dict):
        """-> (prepared model, prepared optimizer, raw optimizer, what happened to the optimizer state)."""
        acc = self.accelerator
        moe = acc.unwrap_model(model)
        old_count = moe.config.num_experts
        carried = raw_optimizer.state_dict() if _reshapeable(raw_optimizer, self.deepspeed) else None
        masters = [full_fp32(p).cpu() for p in moe.trainable_parameters()] if self.deepspeed else None
        acc.free_memory()  # out of DDP / DeepSpeed: their wrappers hold the old tensors
        with sharding.full_experts(acc, moe):  # ZeRO-3: the old experts whole, to widen them
            for _ in range(count):
                moe.add_expert(self.cfg.train.grow_init, note=note)
        optimizer = build.build_optimizer(moe, self.cfg, cpu_offload=self.cpu_offload)
        if carried is not None:
            optimizer.load_state_dict(widen_optimizer_state(carried, moe, old_count))
        model, prepared = acc.prepare(moe, optimizer)
        if masters is not None:
            _set_fp32_masters(moe, masters, old_count)
        return model, prepared, optimizer, self._optimizer_report(raw_optimizer, carried is not None, old_count)

    def _optimizer_report(self, old_optimizer, carried: bool, old_count: int) -> str:
        if carried:
            return (f"optimizer: AdamW moments (exp_avg, exp_avg_sq) of the {old_count} old experts and the router "
                    "carried, step count kept; the new experts' moments start at 0")
        if self.deepspeed:
            return ("optimizer RESET: DeepSpeed ZeRO keeps its optimizer state flattened and partitioned across ranks, "
                    "which is not reshaped; the grown model starts a fresh optimizer: Adam moments (exp_avg, "
                    "exp_avg_sq) of every expert and the router are 0 and the Adam step count is 0. Weights are "
                    "carried exactly (from DeepSpeed's fp32 master copy)")
        return (f"optimizer RESET: {type(old_optimizer).__name__} state cannot be widened (only torch AdamW's can); "
                "the grown model starts a fresh optimizer (every moment 0, step count 0)")


def widen_optimizer_state(state: dict, moe, old_count: int) -> dict:
    """A torch optimizer state_dict of the model with `old_count` experts -> one for the
    grown model: each per-expert tensor (exp_avg, exp_avg_sq, ...) keeps the old experts'
    slices and gets zeros for the new ones; scalars (the step count) are kept. Relies on
    trainable_parameters keeping its order through growth (each tensor is replaced in
    its own slot)."""
    axes = {id(a.get()): a for a in expert_axes(moe)}
    layout = [axes[id(p)] for p in moe.trainable_parameters()]
    added = moe.config.num_experts - old_count
    widened = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        axis = layout[index]
        old_shape = list(axis.get().shape)
        old_shape[axis.axis] = old_count * axis.width
        widened["state"][index] = {
            key: _append_zeros(value, axis, added) if torch.is_tensor(value) and list(value.shape) == old_shape
            else value
            for key, value in values.items()}
    return widened


def _append_zeros(value: torch.Tensor, axis, experts: int) -> torch.Tensor:
    shape = list(value.shape)
    shape[axis.axis] = experts * axis.width
    return torch.cat([value, value.new_zeros(shape)], dim=axis.axis)


def _reshapeable(optimizer, deepspeed: bool) -> bool:
    # Exactly torch's AdamW: its state is per-parameter tensors shaped like the parameter.
    return not deepspeed and type(optimizer) is torch.optim.AdamW


def _set_fp32_masters(moe, masters: list[torch.Tensor], old_count: int) -> None:
    """After DeepSpeed has taken the grown model: its fp32 masters start from the old
    experts' exact fp32 values (the module copy it started from may be bf16)."""
    from deepspeed.utils import safe_set_full_fp32_param

    axes = {id(a.get()): a for a in expert_axes(moe)}
    for param, old in zip(moe.trainable_parameters(), masters):
        axis = axes[id(param)]
        current = full_fp32(param).cpu()  # ZeRO-3: gathered (the module's own tensor is a partition)
        new = axis.select(current, list(range(old_count, moe.config.num_experts)))
        value = torch.cat([old, new], dim=axis.axis).to(param.device)
        if sharding.is_partitioned(param):
            sharding.write_full(param, value)
            continue
        safe_set_full_fp32_param(param, value)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def phase_report(cfg, state, total_steps: int) -> str:
    warmup = cfg.train.warmup_for(total_steps - state.step)
    return (f"a new phase, not an exact resume: the step count continues at {state.step}; the LR schedule restarts "
            f"({cfg.train.lr_scheduler}, warmup {warmup}, over the {total_steps - state.step} steps to max_steps "
            f"{total_steps}); the data stream starts from its beginning; early stopping starts over")


def growth_record(step: int, moe, event: str, reason: str, optimizer: str, extra: Optional[dict] = None) -> dict:
    """One metrics.jsonl record per growth (the same event is in moe_config.json's expert_history)."""
    return {"step": step, "growth": {"event": event, "num_experts": moe.config.num_experts, "reason": reason,
                                     "optimizer": optimizer, **(extra or {})}}
