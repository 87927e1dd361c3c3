"""Does a plan fit a GPU, how large a micro-batch would, which config to recommend,
and the report `dylora-moe plan` prints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from .component import GiB
from .estimate import CUDA_ALLOWANCE_GIB, ROW_NAMES, estimate
from .setup import Step, Strategy, planned_moe, shipped_strategies, step_of
from .shape import ModelShape, model_shape, resolve_base_config

# What nvidia-smi reports as each card's total memory (MiB). The CUDA context and
# allocator slack come out of this, which is why the plan adds an allowance for them.
GPUS = {"A100-40GB": 40536, "A100-80GB": 81920, "H100-80GB": 81559, "L4-24GB": 23034}
# Vertex AI accelerator types (dylora_moe/vertex/submit.py) -> the GPU above.
VERTEX_ACCELERATORS = {"NVIDIA_TESLA_A100": "A100-40GB", "NVIDIA_A100_80GB": "A100-80GB",
                       "NVIDIA_H100_80GB": "H100-80GB", "NVIDIA_L4": "L4-24GB"}


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
        raise UserError(f"--gpu={name!r}: expected one of {list(GPUS)}")
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
