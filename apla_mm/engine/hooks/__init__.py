from .apla_hook import APLAHook
from .checkpoint_check_hook import CheckpointCheckHook
from .checkpoint_hook import SafeCheckpointHook
from .lora_hook import LoRAHook
from .memory_hook import MemoryEfficientHook
from .peft_hook import BasePEFTHook, PEFTHook
from .seg_visualization_hook import SegTestVisualizationHook

__all__ = [
    'APLAHook', 'BasePEFTHook', 'CheckpointCheckHook', 'LoRAHook',
    'MemoryEfficientHook', 'PEFTHook', 'SafeCheckpointHook', 'SegTestVisualizationHook'
]
