"""Training: recipes, the Accelerate loop, checkpoints, preemption, monitoring."""
from ..recipe import ModelConfig, RunConfig, TrainConfig, load_recipe

__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "load_recipe", "train"]


def train(cfg):
    from .loop import train as run

    return run(cfg)
