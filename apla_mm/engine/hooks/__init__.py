from .apla_hook import APLAHook
from .lora_hook import LoRAHook
from .peft_hook import BasePEFTHook

__all__ = ['APLAHook', 'BasePEFTHook', 'LoRAHook']
