"""Training-memory options for dense prediction models.

At the crops users train with (512² for ADE20K), the decode head, the neck
and the loss keep more for backward than an adapted ViT backbone. The
options here cut that memory without changing the training maths, for
APLA, LoRA, frozen-backbone and full fine-tuning alike::

    from apla_mm.memory import MemoryConfig, apply_memory_options
    handle = apply_memory_options(model, MemoryConfig(
        lean_loss=True, checkpoint_blocks=True, checkpoint_heads=True,
        fused_attention=True, frozen_dtype='bfloat16'))
    ...initialise/load weights (and adapter.refresh_())...
    handle.cast_frozen_()        # frozen weights -> bf16, fp32 masters kept
    ...train under autocast...
    handle.remove()              # the unmodified model, fp32 weights

In a Runner: ``custom_hooks = [..., dict(type='MemoryEfficientHook',
lean_loss=True, checkpoint_blocks=True, checkpoint_heads=True,
frozen_dtype='bfloat16', fused_attention=True)]`` (see :class:`~apla_mm.engine.hooks.MemoryEfficientHook`
and ``docs/memory.md``).
"""
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn

from .checkpointing import (disable_block_checkpointing,
                            disable_head_checkpointing,
                            enable_block_checkpointing,
                            enable_head_checkpointing)
from .config import FROZEN_DTYPES, MemoryConfig
from .fused_attention import disable_fused_attention, enable_fused_attention
from .lean_loss import disable_lean_loss, enable_lean_loss
from .low_precision import FrozenLowPrecision, castable_frozen_parameters

__all__ = [
    'FROZEN_DTYPES', 'FrozenLowPrecision', 'MemoryConfig', 'MemoryHandle',
    'apply_memory_options', 'castable_frozen_parameters'
]


class MemoryHandle:
    """What :func:`apply_memory_options` did to a model, and how to undo it.

    Attributes:
        config (MemoryConfig): The options.
        lean_heads (dict[str, bool]): Heads with the lean loss -> whether
            they take the banded cross-entropy fast path.
        blocks (list[str]): Transformer blocks recomputed in backward.
        checkpointed (list[str]): Modules given a checkpointed region
            forward.
        fused_mha (list[str]): ``nn.MultiheadAttention`` modules running
            through SDPA.
        fused_timm (list[str]): timm attention modules whose ``fused_attn``
            was turned on.
        low_precision (FrozenLowPrecision, optional): Set by
            :meth:`cast_frozen_`.
    """

    def __init__(self, model: nn.Module, config: MemoryConfig) -> None:
        self.model = model
        self.config = config
        self.lean_heads: Dict[str, bool] = {}
        self.blocks: List[str] = []
        self.checkpointed: List[str] = []
        self.fused_mha: List[str] = []
        self.fused_timm: List[str] = []
        self.low_precision: Optional[FrozenLowPrecision] = None

    def cast_frozen_(self,
                     dtype: Union[str, torch.dtype, None] = None,
                     master_device: Optional[str] = 'cpu'
                     ) -> FrozenLowPrecision:
        """Store the frozen linear/conv/attention weights in ``dtype``
        (default: ``config.frozen_dtype``), keeping fp32 masters that
        ``state_dict()`` returns. Run it after the weights are initialised
        or loaded and after APLA's rows were refreshed from them; train
        under autocast of the same dtype. A second call recasts (after
        :meth:`restore_frozen_`)."""
        if dtype is None:
            dtype = self.config.frozen_dtype
        if dtype is None:
            raise ValueError('cast_frozen_: no dtype; pass one or set '
                             "MemoryConfig.frozen_dtype='bfloat16'.")
        if isinstance(dtype, str):
            if dtype not in FROZEN_DTYPES:
                raise ValueError(f'dtype must be one of {FROZEN_DTYPES}, '
                                 f'got {dtype!r}.')
            dtype = getattr(torch, dtype)
        lp = self.low_precision
        if lp is not None and lp.dtype != dtype:
            lp.remove()
            lp = None
        if lp is None:
            self.low_precision = FrozenLowPrecision(self.model, dtype,
                                                    master_device)
        else:
            lp.cast_()
        return self.low_precision

    def restore_frozen_(self) -> None:
        """fp32 frozen weights back in the model (masters, with APLA's
        trained rows); :meth:`cast_frozen_` casts again."""
        if self.low_precision is not None:
            self.low_precision.restore_()

    @property
    def frozen_cast(self) -> bool:
        """Whether frozen weights are currently stored in low precision."""
        return self.low_precision is not None and self.low_precision.active

    def summary(self) -> str:
        """One line per option, for logs."""
        parts = []
        if self.config.lean_loss:
            fast = [n for n, f in self.lean_heads.items() if f]
            slow = [n for n, f in self.lean_heads.items() if not f]
            parts.append(
                f'lean_loss: {len(self.lean_heads)} heads ('
                + (f'banded cross-entropy: {fast}' if fast else '')
                + ('; ' if fast and slow else '')
                + (f'checkpointed loss: {slow}' if slow else '') + ')')
        if self.config.checkpoint_blocks:
            parts.append(f'checkpoint_blocks: {len(self.blocks)} '
                         'transformer blocks')
        if self.config.checkpoint_heads:
            parts.append(f'checkpoint_heads: {len(self.checkpointed)} '
                         'regions in the neck/heads')
        if self.config.fused_attention:
            parts.append(
                f'fused_attention: {len(self.fused_mha)} '
                'nn.MultiheadAttention through scaled_dot_product_attention'
                + (f', fused_attn on in {len(self.fused_timm)} timm '
                   'attention modules' if self.fused_timm else '')
                + ('' if self.fused_mha or self.fused_timm else
                   ' (the model\'s attention is already fused)'))
        if self.config.frozen_dtype is not None:
            lp = self.low_precision
            parts.append(
                f'frozen_dtype: {self.config.frozen_dtype}' +
                (f', {len(lp.entries)} frozen tensors cast, '
                 f'{lp.num_bytes_saved() / 2**20:.1f} MiB saved'
                 if lp is not None and lp.active else ' (not cast yet)'))
        return 'memory options: ' + ('; '.join(parts) if parts else 'none')

    def remove(self) -> nn.Module:
        """Undo everything; returns the model (fp32 frozen weights)."""
        if self.low_precision is not None:
            self.low_precision.remove()
            self.low_precision = None
        disable_lean_loss(self.model, list(self.lean_heads))
        disable_block_checkpointing(self.model, self.blocks)
        disable_head_checkpointing(self.model, self.checkpointed)
        disable_fused_attention(self.model, self.fused_mha, self.fused_timm)
        self.lean_heads, self.blocks, self.checkpointed = {}, [], []
        self.fused_mha, self.fused_timm = [], []
        return self.model


def apply_memory_options(model: nn.Module,
                         config: Union[MemoryConfig, dict]) -> MemoryHandle:
    """Apply the structural options of ``config`` to ``model`` in place.

    ``lean_loss``, ``checkpoint_blocks``, ``checkpoint_heads`` and
    ``fused_attention`` change methods only, through the class swaps every
    structural change of apla_mm uses (:mod:`apla_mm.peft.swap`: no
    parameter or state-dict key changes; ``torch.save(model)`` and
    ``copy.deepcopy`` work), so they can be applied right after the model is
    built, before or after a PEFT adapter, in any order. ``frozen_dtype`` is *not* applied here:
    call :meth:`MemoryHandle.cast_frozen_` once the weights are loaded.

    Args:
        model (nn.Module): The unwrapped segmentor (or detector, for
            ``checkpoint_heads``/``fused_attention``).
        config (MemoryConfig | dict): Options.

    Returns:
        MemoryHandle: What was done; ``.remove()`` undoes it.
    """
    if isinstance(config, dict):
        config = MemoryConfig(**config)
    handle = MemoryHandle(model, config)
    try:
        if config.lean_loss:
            handle.lean_heads = enable_lean_loss(model,
                                                 config.lean_loss_chunk_mb)
        if config.checkpoint_blocks:
            handle.blocks = enable_block_checkpointing(model)
        if config.checkpoint_heads:
            handle.checkpointed = enable_head_checkpointing(model)
        if config.fused_attention:
            handle.fused_mha, handle.fused_timm = enable_fused_attention(
                model)
    except Exception:
        handle.remove()
        raise
    return handle
