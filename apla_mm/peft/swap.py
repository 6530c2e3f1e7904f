"""Per-instance class swaps: the one way apla_mm changes what a module does.

Every structural change apla_mm makes to a built model goes through this
module: a PEFT method that routes a weight's gradient to trainable rows
(APLA) or adds ``B @ A`` (LoRA), and the memory options that recompute a
block or a head region in backward, keep only the low-resolution logits for
the loss, or run attention through SDPA (:mod:`apla_mm.memory`). Each
changes, for one module instance and without touching other instances, the
module's state-dict keys or its owner's code (mmseg's
``nn.MultiheadAttention`` reads ``out_proj.weight`` without calling
``out_proj``), a property or a method. :func:`swap_class` gives the instance
a cached subclass of its class carrying those attributes, the mechanism
:mod:`torch.nn.utils.parametrize` uses too.

Swaps stack: a transformer block can be checkpointed (a memory option) while
its attention's ``out_proj`` is adapted (a method), and an
``nn.MultiheadAttention`` can carry LoRA's merged-weight property and the
SDPA forward at once. The class of a module swapped with kinds ``(k1, k2)``
is ``K2(K1(Base))``; a swapped method reaches the behaviour below it with
:func:`below` (``below(self, KIND).forward(self, ...)``), never with the
base class, so that swaps compose in either order. :func:`restore_class`
removes one kind, whatever its position, and keeps the others.

Why not :mod:`torch.nn.utils.parametrize`: it recomputes (and, under
autograd, stores) a weight copy per forward and renames the state-dict keys
(``weight`` becomes ``parametrizations.weight.original``), so checkpoints
would no longer load into the base model. Why not instance attributes
(``module.forward = MethodType(...)``): bound methods in ``__dict__`` do not
survive ``torch.save(module)``/``torch.load`` and are easy to shadow.

Every kind is registered once, at import, with :func:`register_swap` under a
stable name. The names, not the generated classes, are what :mod:`pickle`
stores, so ``torch.save(model)`` and :func:`copy.deepcopy` (mmengine's EMA
hook) work on changed models, and the unpickled modules get the same
classes back. Per-instance settings a swap needs live in plain instance
attributes (numbers, strings), which pickle too.
"""
from typing import Dict, Optional, Tuple, Type

import torch.nn as nn

_KINDS: Dict[str, Tuple[str, Dict[str, object], Optional[str]]] = {}
_CLASSES: Dict[Tuple[type, Tuple[str, ...]], type] = {}


def register_swap(kind: str,
                  prefix: str,
                  namespace: Dict[str, object],
                  group: Optional[str] = None) -> str:
    """Register a kind of swap.

    Args:
        kind (str): Stable name, e.g. ``'apla.linear'``.
        prefix (str): Prefix of the generated class names, e.g. ``'APLA'``
            (``Linear`` becomes ``APLALinear``).
        namespace (dict): Class attributes (properties, methods).
        group (str, optional): Kinds of one group exclude each other on a
            module (``'adapter'``: one PEFT method per module at a time).

    Returns:
        str: ``kind``.
    """
    entry = (prefix, namespace, group)
    if kind in _KINDS and _KINDS[kind] != entry:
        raise ValueError(f'swap kind {kind!r} is already registered')
    _KINDS[kind] = entry
    return kind


def _reduce_ex(self, protocol):
    # Pickle the instance as "its original class, swapped with `kinds`": the
    # generated classes are not importable under their names.
    state = self.__getstate__() if hasattr(self, '__getstate__') \
        else self.__dict__
    return (_rebuild, (base_class(self), swap_kinds(self)), state)


def _rebuild(base: type, kinds) -> nn.Module:
    if isinstance(kinds, str):  # pickled by apla_mm 0.2 (one kind)
        kinds = (kinds, )
    obj = base.__new__(base)
    obj.__class__ = swapped_class(base, tuple(kinds))
    return obj


def swapped_class(base: type, kinds: Tuple[str, ...]) -> type:
    """The (cached) subclass of ``base`` with the registered ``kinds``
    applied in order (the last one outermost)."""
    if isinstance(kinds, str):
        kinds = (kinds, )
    if not kinds:
        return base
    key = (base, tuple(kinds))
    if key not in _CLASSES:
        kind = kinds[-1]
        if kind not in _KINDS:
            raise KeyError(
                f'unknown swap kind {kind!r}; import the apla_mm module that '
                'registers it (import apla_mm).')
        below_cls = swapped_class(base, kinds[:-1])
        prefix, namespace, _ = _KINDS[kind]
        attrs = dict(namespace)
        attrs.update(_apla_mm_base_class=base, _apla_mm_swap_kinds=key[1],
                     _apla_mm_own_kind=kind, __module__=base.__module__,
                     __reduce_ex__=_reduce_ex)
        _CLASSES[key] = type(f'{prefix}{below_cls.__name__}', (below_cls, ),
                             attrs)
    return _CLASSES[key]


def swap_kinds(module: nn.Module) -> Tuple[str, ...]:
    """The kinds ``module`` is swapped with, innermost first."""
    return getattr(type(module), '_apla_mm_swap_kinds', ())


def has_swap(module: nn.Module, kind: str) -> bool:
    """Whether ``module`` carries the swap ``kind``."""
    return kind in swap_kinds(module)


def swap_class(module: nn.Module, kind: str) -> None:
    """Add the swap ``kind`` to ``module``, in place (outermost).

    Raises:
        RuntimeError: if the module already carries ``kind``, or another
            kind of the same group (one PEFT method per module at a time;
            unload the first).
    """
    kinds = swap_kinds(module)
    if kind not in _KINDS:
        raise KeyError(f'unknown swap kind {kind!r}')
    group = _KINDS[kind][2]
    clash = [k for k in kinds
             if k == kind or (group is not None and _KINDS[k][2] == group)]
    if clash:
        raise RuntimeError(
            f'{type(module).__name__} is already adapted ({clash[0]}); '
            'remove the first adapter (unload) before adding another.')
    module.__class__ = swapped_class(base_class(module), kinds + (kind, ))


def restore_class(module: nn.Module, kind: Optional[str] = None) -> None:
    """Remove the swap ``kind`` from ``module`` (the outermost one if
    ``None``), keeping the others."""
    kinds = swap_kinds(module)
    if not kinds:
        return
    kind = kinds[-1] if kind is None else kind
    if kind not in kinds:
        return
    module.__class__ = swapped_class(base_class(module),
                                     tuple(k for k in kinds if k != kind))


def base_class(module: nn.Module) -> Type[nn.Module]:
    """The class ``module`` had before any swap."""
    return getattr(type(module), '_apla_mm_base_class', None) or type(module)


def below(module: nn.Module, kind: str) -> type:
    """The class under the swap ``kind`` in ``module``'s class stack: what
    a swapped method calls to run the behaviour it wraps
    (``below(self, KIND).forward(self, *args)``)."""
    for cls in type(module).__mro__:
        if cls.__dict__.get('_apla_mm_own_kind') == kind:
            return cls.__mro__[1]
    raise RuntimeError(f'{type(module).__name__} has no swap {kind!r}')


# -- properties standing in for parameters ------------------------------------
def own_tensor(module: nn.Module, name: str):
    """The tensor ``module`` holds as its parameter ``name``.

    Usually ``module._parameters[name]``. FSDP (``use_orig_params=True``)
    replaces a parameter, around forward and backward, by a plain tensor
    view of its gathered flat parameter, set with ``setattr`` after
    ``delattr`` (``torch/distributed/fsdp/_flat_param.py``,
    ``_setattr_tensor``); a swap's property stores that view in the
    instance ``__dict__`` (:func:`parameter_property`), read here first.
    """
    value = module.__dict__.get(name)
    if value is not None:
        return value
    return module._parameters.get(name)


def managed_by_fsdp(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is currently a view FSDP set (see
    :func:`own_tensor`)."""
    return name in module.__dict__


def parameter_property(name: str, getter) -> property:
    """A property for parameter ``name`` of a swapped class: ``getter`` on
    read; on write, a ``nn.Parameter`` (or None) goes to ``_parameters`` and
    a plain tensor (FSDP's views) to the instance ``__dict__``; deleting
    removes either. Reading a parameter that is not there raises
    ``AttributeError``, as for a plain module (``hasattr`` is False between
    FSDP's ``delattr`` and ``setattr``)."""

    def fget(self):
        if name not in self.__dict__ and name not in self._parameters:
            raise AttributeError(name)
        return getter(self)

    def fset(self, value) -> None:
        if value is None or isinstance(value, nn.Parameter):
            self.__dict__.pop(name, None)
            self._parameters[name] = value
        else:
            self._parameters.pop(name, None)
            self.__dict__[name] = value

    def fdel(self) -> None:
        if name in self.__dict__:
            del self.__dict__[name]
        else:
            self._parameters.pop(name, None)

    return property(fget, fset, fdel)
