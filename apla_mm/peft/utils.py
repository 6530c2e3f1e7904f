"""Small helpers shared by the PEFT methods and their hooks."""
from typing import Callable, Dict

import torch.nn as nn


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
