"""Small helpers shared by the PEFT methods."""
import re
from typing import Callable, Dict, List, Sequence, Tuple, Type

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_SWAPPED: Dict[Tuple[type, str], type] = {}


def swap_class(module: nn.Module, tag: str, namespace: Dict[str,
                                                             object]) -> None:
    """Give ``module`` a subclass of its class with extra class attributes.

    This is how properties can stand in for parameters (``weight``/``bias``)
    of one module instance without touching other instances or the state
    dict, the mechanism :mod:`torch.nn.utils.parametrize` uses. The
    subclass is cached per (class, tag) and keeps the original name with a
    prefix, e.g. ``APLALinear``.

    Args:
        module (nn.Module): Module to modify in place.
        tag (str): Name prefix of the subclass, e.g. ``'APLA'``.
        namespace (dict): Class attributes (properties, methods).
    """
    cls = type(module)
    if getattr(cls, '_apla_mm_base_class', None) is not None:
        raise RuntimeError(
            f'{type(module).__name__} is already adapted; remove the first '
            'adapter (unload) before adding another.')
    key = (cls, tag)
    if key not in _SWAPPED:
        attrs = dict(namespace)
        attrs['_apla_mm_base_class'] = cls
        attrs['__module__'] = cls.__module__
        _SWAPPED[key] = type(f'{tag}{cls.__name__}', (cls, ), attrs)
    module.__class__ = _SWAPPED[key]


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class`."""
    base = getattr(type(module), '_apla_mm_base_class', None)
    if base is not None:
        module.__class__ = base


def base_class(module: nn.Module) -> Type[nn.Module]:
    """The class ``module`` had before :func:`swap_class`."""
    return getattr(type(module), '_apla_mm_base_class', None) or type(module)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP-style wrapper, or ``model`` itself."""
    from mmengine.model import is_model_wrapper
    while is_model_wrapper(model):
        model = model.module
    return model


def remove_hooks(handles: Dict[str, Callable]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()


_BLOCK_NAME = re.compile(r'(?:.*\.)?(?:blocks|layers)\.\d+$')


def _checkpointed_forward(self, *args, **kwargs):
    forward = base_class(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def enable_block_checkpointing(model: nn.Module,
                               layer_names: Sequence[str]) -> List[str]:
    """Recompute, in backward, the transformer blocks holding these layers.

    Each adapted layer's nearest ancestor named ``...blocks.N`` or
    ``...layers.N`` (timm, mmseg, mmpretrain ViT blocks) keeps only its input
    for backward and runs its forward again when the gradient reaches it
    (non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so trainable
    tensors inside frozen blocks still get their gradients).

    Returns:
        list[str]: Names of the checkpointed blocks.
    """
    blocks = []
    for name in layer_names:
        parts = name.split('.')
        for end in range(len(parts) - 1, 0, -1):
            candidate = '.'.join(parts[:end])
            if _BLOCK_NAME.fullmatch(candidate):
                if candidate not in blocks:
                    blocks.append(candidate)
                break
        else:
            raise ValueError(
                f'with_cp: found no transformer block (a module named '
                f'"blocks.N" or "layers.N") around {name!r}.')
    for name in blocks:
        swap_class(model.get_submodule(name), 'Checkpointed',
                   {'forward': _checkpointed_forward})
    return blocks


def disable_block_checkpointing(model: nn.Module,
                                blocks: Sequence[str]) -> None:
    """Undo :func:`enable_block_checkpointing`."""
    for name in blocks:
        restore_class(model.get_submodule(name))
