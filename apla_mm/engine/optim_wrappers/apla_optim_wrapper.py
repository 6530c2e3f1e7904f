"""Optimizer wrappers that keep APLA's frozen weights in step with its rows."""
from contextlib import contextmanager
from typing import Optional

import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from apla_mm.peft.apla import APLAAdapter
from apla_mm.registry import OPTIM_WRAPPERS
from .amp import PortableAmpMixin


class APLAOptimWrapperMixin:
    """Behaviour shared by :class:`APLAOptimWrapper` and its AMP variant.

    :class:`~apla_mm.engine.APLAHook` binds the :class:`APLAAdapter` to the
    wrapper before training. After every optimizer step the wrapper copies
    the updated rows into the projection weights (:meth:`APLAAdapter.sync_`):
    only the selected rows change, so the frozen rows are never written.
    Stepping without a bound adapter is an error, since the model would then
    train on stale weights.
    """

    _apla_adapter: Optional[APLAAdapter] = None

    def bind_adapter(self, adapter: APLAAdapter) -> None:
        """Attach the adapter whose rows this wrapper's optimizer trains."""
        self._apla_adapter = adapter

    @property
    def adapter(self) -> Optional[APLAAdapter]:
        return self._apla_adapter

    def _check_bound(self) -> None:
        if self._apla_adapter is None:
            raise RuntimeError(
                f'{type(self).__name__} is used without APLAHook. Add '
                "custom_hooks = [dict(type='APLAHook', rank=64)] to the "
                "config, or use type='OptimWrapper' for a run without APLA.")

    @contextmanager
    def optim_context(self, model: nn.Module):
        self._check_bound()
        with super().optim_context(model):
            yield

    def step(self, **kwargs) -> None:
        self._check_bound()
        super().step(**kwargs)
        self._apla_adapter.sync_()


@OPTIM_WRAPPERS.register_module()
class APLAOptimWrapper(APLAOptimWrapperMixin, OptimWrapper):
    """:class:`mmengine.optim.OptimWrapper` for APLA runs.

    Use it with :class:`~apla_mm.engine.APLAHook`::

        custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]
        optim_wrapper = dict(type='APLAOptimWrapper',
                             optimizer=dict(type='AdamW', lr=1e-4))

    Gradient clipping, accumulation and paramwise settings work as in
    ``OptimWrapper``.
    """


@OPTIM_WRAPPERS.register_module()
class APLAAmpOptimWrapper(APLAOptimWrapperMixin, PortableAmpMixin,
                          AmpOptimWrapper):
    """Mixed-precision :class:`APLAOptimWrapper` (float16 with loss scaling
    on GPUs, bfloat16 on CPUs). ``tools/train.py --amp`` switches an
    ``APLAOptimWrapper`` config to it."""
