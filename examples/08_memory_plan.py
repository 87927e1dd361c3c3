"""Plan GPU memory before launching: the numbers of `dylora-moe plan`, in Python.

The base is built on PyTorch's meta device from its config (a built-in copy for
google/codegemma-2b), so nothing is downloaded or allocated: this works offline on CPU.
"""
from pathlib import Path

from dylora_moe.plan import plan_recipe
from dylora_moe.train import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "codegemma-2b.yaml"

for overrides in ([], ["--load_in_4bit", "--num_experts", "8", "--gradient_checkpointing"]):
    cfg = load_recipe(str(RECIPE), overrides)
    report = plan_recipe(cfg, gpus=["L4-24GB"])
    print("overrides:", " ".join(overrides) or "(none)")
    print(f"  {report.shape.base_params / 1e9:.2f} B base parameters, "
          f"{report.shape.expert_params / 1e6:.2f} M expert parameters")
    for plan in report.plans:  # one per shipped accelerate config
        parts = ", ".join(f"{c.key} {c.gib:.2f}" for c in plan.components if c.in_peak and c.where == "gpu")
        print(f"  {plan.strategy.name:14s} peak {plan.peak_gib:5.2f} GiB ({parts})")
    for f in report.fits:
        print(f"  L4 24 GB, {f.strategy:14s} fits={f.fits} headroom {f.headroom_gib:+.1f} GiB, "
              f"largest micro-batch {f.max_micro_batch}")
