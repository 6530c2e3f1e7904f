"""Per-instance class swaps: how a method changes one module's behaviour.

A PEFT method that adds nothing to the architecture still has to change what
``module.weight`` returns (APLA routes its gradient to trainable rows, LoRA
adds ``B @ A``) or what ``forward`` computes, for one module instance and
without touching other instances, the module's state-dict keys or its
owner's code (mmseg's ``nn.MultiheadAttention`` reads ``out_proj.weight``
without calling ``out_proj``). :func:`swap_class` gives the instance a
cached subclass of its class carrying properties and methods, the mechanism
:mod:`torch.nn.utils.parametrize` uses too.

Why not :mod:`torch.nn.utils.parametrize` itself: it recomputes (and, under
autograd, stores) a weight copy per forward and renames the state-dict keys
(``weight`` becomes ``parametrizations.weight.original``), so checkpoints
would no longer load into the base model.

Every kind of swap is registered once, at import, with
:func:`register_swap` under a stable name. That name, not the generated
class, is what :mod:`pickle` stores, so ``torch.save(model)`` and
:func:`copy.deepcopy` (mmengine's EMA hook) work on adapted models, and the
unpickled modules get the same subclass back.
"""
from typing import Dict, Tuple, Type

import torch.nn as nn

_KINDS: Dict[str, Tuple[str, Dict[str, object]]] = {}
_CLASSES: Dict[Tuple[type, str], type] = {}


def register_swap(kind: str, prefix: str, namespace: Dict[str,
                                                          object]) -> str:
    """Register a kind of swap.

    Args:
        kind (str): Stable name, e.g. ``'apla.linear'``.
        prefix (str): Prefix of the generated class names, e.g. ``'APLA'``
            (``Linear`` becomes ``APLALinear``).
        namespace (dict): Class attributes (properties, methods).

    Returns:
        str: ``kind``.
    """
    if kind in _KINDS and _KINDS[kind] != (prefix, namespace):
        raise ValueError(f'swap kind {kind!r} is already registered')
    _KINDS[kind] = (prefix, namespace)
    return kind


def _reduce_ex(self, protocol):
    # Pickle the instance as "its original class, swapped with `kind`": the
    # generated class is not importable under its name.
    state = self.__getstate__() if hasattr(self, '__getstate__') \
        else self.__dict__
    return (_rebuild, (type(self)._apla_mm_base_class,
                       type(self)._apla_mm_swap_kind), state)


def _rebuild(base: type, kind: str) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = swapped_class(base, kind)
    return obj


def swapped_class(base: type, kind: str) -> type:
    """The (cached) subclass of ``base`` for a registered ``kind``."""
    key = (base, kind)
    if key not in _CLASSES:
        if kind not in _KINDS:
            raise KeyError(
                f'unknown swap kind {kind!r}; import the apla_mm module that '
                'registers it (import apla_mm).')
        prefix, namespace = _KINDS[kind]
        attrs = dict(namespace)
        attrs.update(_apla_mm_base_class=base, _apla_mm_swap_kind=kind,
                     __module__=base.__module__, __reduce_ex__=_reduce_ex)
        _CLASSES[key] = type(f'{prefix}{base.__name__}', (base, ), attrs)
    return _CLASSES[key]


def swap_class(module: nn.Module, kind: str) -> None:
    """Give ``module`` the subclass of its class for ``kind``, in place.

    Raises:
        RuntimeError: if the module is already swapped (one method at a
            time per module; unload the first).
    """
    if getattr(type(module), '_apla_mm_base_class', None) is not None:
        raise RuntimeError(
            f'{type(module).__name__} is already adapted; remove the first '
            'adapter (unload) before adding another.')
    module.__class__ = swapped_class(type(module), kind)


def restore_class(module: nn.Module) -> None:
    """Undo :func:`swap_class`."""
    base = getattr(type(module), '_apla_mm_base_class', None)
    if base is not None:
        module.__class__ = base


def base_class(module: nn.Module) -> Type[nn.Module]:
    """The class ``module`` had before :func:`swap_class`."""
    return getattr(type(module), '_apla_mm_base_class', None) or type(module)
