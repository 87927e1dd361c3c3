from .config import MoEConfig
from .layer import StackedLoRALinear
from .moe import DyLoRAMoE, MoEOutput
from .router import LinearRouter

__all__ = ["DyLoRAMoE", "MoEConfig", "MoEOutput", "StackedLoRALinear", "LinearRouter"]
