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
zero3_offload: sharded.py), then checked against common GPUs, with the first
config that fits recommended per GPU. Why each formula is what it is sits next to it;
the test (tests/test_plan.py) holds the estimate to the measured peak of real training
steps, one of them on a base sharded by FSDP2 over 2 processes.

The package, bottom to top: shape (the base's shapes), setup (the accelerate config and
the micro-batch), component and sharded (the terms; sharded: those of a sharded base),
estimate (one config's peak), fit (GPUs, recommendation, the report), cli.
"""
from .cli import main
from .component import GiB, Component
from .estimate import CUDA_ALLOWANCE_GIB, Plan, base_weights, estimate, measured_cpu_peak
from .fit import GPUS, VERTEX_ACCELERATORS, Report, fit, fit_warning, format_report, plan_recipe, recommended
from .setup import (KINDS, ROOT, SHIPPED, Step, Strategy, shipped_strategies, step_of, strategy_from_env,
                    strategy_named, strategy_of_config)
from .shape import ModelShape, model_shape, resolve_base_config

__all__ = ["main", "GiB", "Component", "CUDA_ALLOWANCE_GIB", "Plan", "base_weights", "estimate", "measured_cpu_peak",
           "GPUS", "VERTEX_ACCELERATORS", "Report", "fit", "fit_warning", "format_report", "plan_recipe",
           "recommended", "KINDS", "ROOT", "SHIPPED", "Step", "Strategy", "shipped_strategies", "step_of",
           "strategy_from_env", "strategy_named", "strategy_of_config", "ModelShape", "model_shape",
           "resolve_base_config"]
