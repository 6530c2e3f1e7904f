"""Parameter-efficient fine-tuning methods, independent of the Runner.

Each method is an *adapter* object applied to a built model (HF peft's
"tuner"), with a small config dataclass, a trainable-parameter report and a
delta export. The mmengine hooks in :mod:`apla_mm.engine` drive them.
"""
from .apla import (APLAAdapter, APLAConfig, APLALayer, load_index_file,
                   random_channels)
from .lora import LoRAAdapter, LoRAConfig, LoRALayer
from .optim import rebind_optimizer
from .report import count_parameters, format_report
from .targets import (ATTN_OUT_PATTERNS, ATTN_QKV_PATTERNS,
                      TargetNotFoundError, find_modules)

__all__ = [
    'APLAAdapter', 'APLAConfig', 'APLALayer', 'ATTN_OUT_PATTERNS',
    'ATTN_QKV_PATTERNS', 'LoRAAdapter', 'LoRAConfig', 'LoRALayer',
    'TargetNotFoundError', 'count_parameters',
    'find_modules', 'format_report', 'load_index_file', 'random_channels',
    'rebind_optimizer'
]
