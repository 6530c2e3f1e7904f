"""Let torch >= 2.6 load mmengine's own checkpoints, without disabling safety.

torch 2.6 changed the default of ``torch.load`` to ``weights_only=True``.
mmengine 0.10.7 calls ``torch.load`` without the argument
(``mmengine/runner/checkpoint.py``), and the checkpoints it writes hold, besides
tensors, :class:`mmengine.logging.HistoryBuffer` objects and numpy arrays and
scalars (``message_hub`` and ``meta``). The weights-only unpickler refuses
those, so ``--resume``, ``load_from`` of an mmengine checkpoint and
``tools/test.py`` fail with ``Weights only load failed ... Unsupported global``
(open-mmlab/mmengine#1655; fixed on mmengine's main branch by #1670, which
turns the check off, and not released).

We keep the weights-only unpickler and add exactly the types mmengine writes to
torch's allowlist (:func:`torch.serialization.add_safe_globals`): the history
buffer and numpy's array/scalar reconstruction. The buffer's statistics
methods are pickled (protocol 2) as ``getattr(HistoryBuffer, 'mean')``;
rather than allowing ``builtins.getattr`` (which would open every attribute
of every allowed object), the name ``builtins.getattr`` is bound to
:func:`history_buffer_getattr`, which resolves only those methods and refuses
anything else. A checkpoint still cannot execute code when loaded. The call
is idempotent and happens when :mod:`apla_mm` is imported.
"""
import pickle
from typing import Any, List, Tuple, Union

import numpy as np
import torch

_REGISTERED = False


def _numpy_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """Numpy callables and types that appear in pickled arrays and scalars."""
    entries: List[Union[Any, Tuple[Any, str]]] = [np.ndarray, np.dtype]
    try:  # numpy >= 2
        from numpy._core import multiarray
        core_names = ('numpy._core.multiarray', 'numpy.core.multiarray')
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore
        core_names = ('numpy.core.multiarray', )
    # Files written under numpy 1.x name ``numpy.core``; numpy 2 writes
    # ``numpy._core``. Allow both spellings of the same two functions.
    for func in (multiarray._reconstruct, multiarray.scalar):
        for module in core_names:
            entries.append((func, f'{module}.{func.__name__}'))
    # One dtype class per scalar type (``numpy.dtypes.Float64DType``, ...).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries.extend(
            getattr(dtypes, name) for name in dir(dtypes)
            if name.endswith('DType') and isinstance(getattr(dtypes, name), type))
    # Scalar types themselves (``np.float64(...)`` values in logs and meta).
    for name in ('bool_', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
                 'uint32', 'uint64', 'float16', 'float32', 'float64'):
        entries.append(getattr(np, name))
    return entries


def history_buffer_getattr(obj: Any, name: str) -> Any:
    """``getattr`` restricted to the public methods of ``HistoryBuffer``.

    Stands in for ``builtins.getattr`` when torch loads weights only.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    from mmengine.logging import HistoryBuffer
    if (obj is HistoryBuffer or isinstance(obj, HistoryBuffer)) \
            and isinstance(name, str) and not name.startswith('_') \
            and callable(vars(HistoryBuffer).get(name)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'weights-only loading refuses getattr({type(obj).__name__}, '
        f'{name!r}); apla_mm allows it only for mmengine HistoryBuffer '
        'methods. Load only checkpoints you trust with weights_only=False.')


def mmengine_safe_globals() -> List[Union[Any, Tuple[Any, str]]]:
    """The allowlist entries needed to read mmengine checkpoints.

    Returns:
        list: Entries in the form accepted by
        :func:`torch.serialization.add_safe_globals`.
    """
    from mmengine.logging import HistoryBuffer
    return [HistoryBuffer, (history_buffer_getattr, 'builtins.getattr')
            ] + _numpy_globals()


def register_checkpoint_safe_globals() -> bool:
    """Allow ``torch.load(weights_only=True)`` to read mmengine checkpoints.

    Returns:
        bool: ``True`` if the allowlist was extended (now or by an earlier
        call), ``False`` on a torch without ``add_safe_globals`` (< 2.4), where
        ``torch.load`` does not default to weights-only anyway.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # pragma: no cover - old torch
        return False
    add_safe_globals(mmengine_safe_globals())
    _REGISTERED = True
    return True
