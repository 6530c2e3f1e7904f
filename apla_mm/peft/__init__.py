"""Parameter-efficient fine-tuning methods, independent of the Runner.

Each method fills in one contract (:mod:`apla_mm.peft.base`, after HF
peft's tuners): a config dataclass (:class:`PeftConfig`), a layer record and
an adapter (:class:`BaseAdapter`) applied to a built model. Every method
uses the same target grammar (:mod:`.targets`) and the same class-swap
mechanism (:mod:`.swap`, which the memory options use too); delta files (:mod:`.delta`) work from the
contract alone. Methods: :mod:`.apla` (APLA) and :mod:`.lora` (LoRA). The
mmengine hooks in :mod:`apla_mm.engine.hooks` (or, at build time,
:func:`apla_mm.models.PEFTModel`) drive them.
"""
from .apla import (APLAAdapter, APLAConfig, APLALayer, load_index_file,
                   random_channels)
from .base import (META_KEY, AdaptedLayer, BaseAdapter, PeftConfig,
                   adapter_class, get_adapter)
from .lora import LoRAAdapter, LoRAConfig, LoRALayer
from .optim import rebind_optimizer
from .report import count_parameters, format_report
from .targets import (ATTN_OUT_PATTERNS, ATTN_QKV_PATTERNS, TARGET_SHORTCUTS,
                      TargetNotFoundError, find_modules, find_targets)

__all__ = [
    'APLAAdapter', 'APLAConfig', 'APLALayer', 'ATTN_OUT_PATTERNS',
    'ATTN_QKV_PATTERNS', 'AdaptedLayer', 'BaseAdapter', 'LoRAAdapter',
    'LoRAConfig', 'LoRALayer', 'META_KEY', 'PeftConfig', 'TARGET_SHORTCUTS',
    'TargetNotFoundError', 'adapter_class', 'count_parameters',
    'find_modules', 'find_targets', 'format_report', 'get_adapter',
    'load_index_file',
    'random_channels', 'rebind_optimizer'
]
