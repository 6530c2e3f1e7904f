from .apla_hook import APLAHook
from .lora_hook import LoRAHook
from .peft_hook import BasePEFTHook
from .seg_visualization_hook import SegTestVisualizationHook

__all__ = [
    'APLAHook', 'BasePEFTHook', 'LoRAHook', 'SegTestVisualizationHook'
]
