"""Mixed precision that also runs on a CPU."""
from contextlib import contextmanager
from typing import Union

import torch
from mmengine.device import (get_device, is_cuda_available,
                             is_mlu_available, is_musa_available,
                             is_npu_available)
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from apla_mm.compat import cpu_autocast_attention_guard, grad_scaler
from apla_mm.registry import OPTIM_WRAPPERS


def _accelerator_available() -> bool:
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


class PortableAmpMixin:
    """Make :class:`mmengine.optim.AmpOptimWrapper` work without a GPU.

    mmengine's wrapper asserts that an accelerator exists. On a CPU we use
    ``bfloat16`` autocast (the only dtype CPU autocast supports), which
    needs no loss scaling: the scaler is a disabled
    loss scaler (:func:`apla_mm.compat.grad_scaler`), so ``backward``/
    ``step``/``state_dict`` keep their usual behaviour. On accelerators
    nothing changes.
    """

    def __init__(self,
                 loss_scale: Union[str, float, dict] = 'dynamic',
                 dtype: Union[str, torch.dtype, None] = None,
                 use_fsdp: bool = False,
                 **kwargs) -> None:
        self._device_type = get_device()  # 'cpu' without an accelerator
        if _accelerator_available():
            super().__init__(
                loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp,
                **kwargs)
            return
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype not in (None, torch.bfloat16):
            raise ValueError(
                f'Mixed precision on a CPU supports bfloat16 only, got '
                f"{dtype}; remove `dtype` or set dtype='bfloat16'.")
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = grad_scaler('cpu', enabled=False)
        self.cast_dtype = torch.bfloat16

    def _attention_guard(self):
        return cpu_autocast_attention_guard(self._device_type,
                                            self.cast_dtype)

    @contextmanager
    def optim_context(self, model):
        """Autocast, with attention kept off kernels the running torch
        cannot differentiate in low precision on a CPU
        (:func:`apla_mm.compat.cpu_autocast_attention_guard`)."""
        with super().optim_context(model), self._attention_guard():
            yield

    def backward(self, loss, **kwargs) -> None:
        """Backward under the same guard: checkpointed blocks recompute
        their forward here and must pick the same attention kernel."""
        with self._attention_guard():
            super().backward(loss, **kwargs)


@OPTIM_WRAPPERS.register_module()
class PortableAmpOptimWrapper(PortableAmpMixin, AmpOptimWrapper):
    """``AmpOptimWrapper`` that falls back to bfloat16 autocast on a CPU.

    ``tools/train.py --amp`` picks it on machines without a GPU.
    """
