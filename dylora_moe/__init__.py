"""DyLoRA-MoE: a mixture of LoRA experts on one frozen causal LM."""
from .model import DyLoRAMoE, MoEConfig, MoEOutput

__version__ = "0.1.0"
__all__ = ["DyLoRAMoE", "MoEConfig", "MoEOutput", "__version__"]
