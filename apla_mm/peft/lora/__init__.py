"""LoRA (arXiv 2106.09685), the baseline: config, layer and adapter."""
from .config import LoRAConfig, lora_scale
from .layer import LoRALayer
from .model import LoRAAdapter

__all__ = ['LoRAAdapter', 'LoRAConfig', 'LoRALayer', 'lora_scale']
