"""The hook that switches on the training-memory options from a config."""
import dataclasses
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from apla_mm.memory import MemoryConfig, MemoryHandle, apply_memory_options
from apla_mm.peft.utils import unwrap_model
from apla_mm.registry import HOOKS
from ..runner_utils import is_training


def autocast_dtype(optim_wrapper) -> Optional[torch.dtype]:
    """The dtype an optimizer wrapper's autocast runs in (None without
    AMP): mmengine's ``AmpOptimWrapper`` (and our portable one) autocast to
    ``cast_dtype``, or to float16 on CUDA when it is unset."""
    from mmengine.optim import AmpOptimWrapper
    if not isinstance(optim_wrapper, AmpOptimWrapper):
        return None
    dtype = getattr(optim_wrapper, 'cast_dtype', None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float16 if torch.cuda.is_available() \
            else torch.bfloat16
    return dtype


@HOOKS.register_module()
class MemoryEfficientHook(Hook):
    """Less training memory, same training maths (``docs/memory.md``).

    Add to the custom hooks of any mmseg config, next to a PEFT hook or
    alone (full fine-tuning)::

        custom_hooks = [
            dict(type='APLAHook', rank=64),
            dict(type='MemoryEfficientHook', lean_loss=True,
                 checkpoint_blocks=True, checkpoint_heads=True,
                 fused_attention=True,
                 frozen_dtype='bfloat16'),   # the last one needs --amp
        ]

    Runner stages (its priority, ``LOW``, puts it after the PEFT hooks):

    * ``before_run`` (training): applies ``lean_loss``,
      ``checkpoint_blocks``, ``checkpoint_heads`` and ``fused_attention``
      (:func:`~apla_mm.memory.apply_memory_options`) and checks that
      ``frozen_dtype`` has an AMP optimizer wrapper of the same dtype.
    * ``before_train``: after the weights were initialised/loaded and
      the PEFT adapter took them over (``on_weights_loaded`` in the PEFT
      hook's ``before_train``, priority ``VERY_HIGH``), stores the frozen weights in ``frozen_dtype`` with fp32
      masters; checkpoints keep the fp32 weights.
    * ``before_val_epoch``/``after_val_epoch``: validation runs without
      autocast, so the fp32 frozen weights are put back for it and cast
      again afterwards.
    * ``after_train``: the fp32 frozen weights are put back.

    Args:
        master_device (str, optional): Where the fp32 masters of the cast
            weights live; ``None`` keeps them on the model's device.
            Defaults to ``'cpu'``.
        **options: The options, documented in one place:
            :class:`~apla_mm.memory.MemoryConfig` (``lean_loss``,
            ``checkpoint_blocks``, ``checkpoint_heads``, ``frozen_dtype``,
            ``fused_attention``, ``lean_loss_chunk_mb``).
    """

    priority = 'LOW'

    def __init__(self, master_device: Optional[str] = 'cpu',
                 **options) -> None:
        names = [f.name for f in dataclasses.fields(MemoryConfig)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f'MemoryEfficientHook: unknown option(s) '
                            f'{unknown}; the options are {names}.')
        self.config = MemoryConfig(**options)
        self.master_device = master_device
        self.handle: Optional[MemoryHandle] = None
        self._training = False

    def before_run(self, runner) -> None:
        if self.handle is not None or not is_training(runner):
            return
        if self.config.frozen_dtype is not None:
            amp = autocast_dtype(runner.optim_wrapper)
            wanted = self.config.torch_frozen_dtype
            if amp is None:
                raise ValueError(
                    f"MemoryEfficientHook(frozen_dtype='"
                    f"{self.config.frozen_dtype}') stores frozen weights in "
                    'low precision, which only works under mixed-precision '
                    'autocast, but the optimizer wrapper is '
                    f'{type(runner.optim_wrapper).__name__}. Train with '
                    "--amp (optim_wrapper=dict(type='AmpOptimWrapper', "
                    f"dtype='{self.config.frozen_dtype}')), or set "
                    'frozen_dtype=None.')
            if amp != wanted:
                raise ValueError(
                    f"MemoryEfficientHook(frozen_dtype='"
                    f"{self.config.frozen_dtype}') does not match the AMP "
                    f'autocast dtype {amp}: autocast would cast the stored '
                    'weights again on every use. Set frozen_dtype='
                    f"'{str(amp).replace('torch.', '')}' or the optimizer "
                    f"wrapper's dtype='{self.config.frozen_dtype}'.")
        model = unwrap_model(runner.model)
        self.handle = apply_memory_options(model, self.config)
        self._training = True

    def before_train(self, runner) -> None:
        if self.handle is None:
            return
        if self.config.frozen_dtype is not None:
            self.handle.cast_frozen_(master_device=self.master_device)
        print_log(self.handle.summary(), logger='current')

    def before_val_epoch(self, runner) -> None:
        if self.handle is not None and self.handle.frozen_cast:
            self.handle.restore_frozen_()
            self._recast = True

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self.handle is not None and getattr(self, '_recast', False):
            self._recast = False
            if self._training:
                self.handle.cast_frozen_(master_device=self.master_device)

    def after_train(self, runner) -> None:
        self._training = False
        if self.handle is not None:
            self.handle.restore_frozen_()
