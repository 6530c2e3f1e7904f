"""Small helpers shared by the PEFT methods and their hooks."""
import hashlib
from typing import Callable, Dict

import torch.nn as nn


def layer_seed(seed: int, name: str, namespace: str = 'apla') -> int:
    """A 63-bit seed derived from ``(namespace, seed, layer name)``, the same
    on every machine and process and whatever else drew random numbers
    before (so a method applied by a hook or at build time starts the
    same)."""
    digest = hashlib.sha256(f'{namespace}:{seed}:{name}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP-style wrapper, or ``model`` itself."""
    from mmengine.model import is_model_wrapper
    while is_model_wrapper(model):
        model = model.module
    return model


def remove_hooks(handles: Dict[str, Callable]) -> None:
    """Remove every hook handle of ``handles`` and empty it."""
    for handle in handles.values():
        handle.remove()
    handles.clear()
