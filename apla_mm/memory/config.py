"""Settings of the memory options (:func:`apla_mm.memory.apply_memory_options`)."""
from dataclasses import asdict, dataclass
from typing import Optional

import torch

#: Dtypes frozen weights can be stored in (autocast's low-precision dtypes).
FROZEN_DTYPES = ('bfloat16', 'float16')


@dataclass
class MemoryConfig:
    """Which training-memory savings to apply to a model.

    Every option keeps the training maths: the same losses and gradients as
    the unmodified model (to float summation order), see ``docs/memory.md``.

    Args:
        lean_loss (bool): Keep only the low-resolution logits of every mmseg
            decode head for backward; the upsampling to the label size, the
            loss and its gradient are recomputed in backward, a band of
            output rows at a time (:mod:`apla_mm.memory.lean_loss`).
            Defaults to False.
        checkpoint_blocks (bool): Activation checkpointing of every
            transformer block of the backbone (non-reentrant: also the first
            blocks of a frozen backbone, whose input needs no gradient),
            the same whatever trains; refused together with the backbone's
            own ``with_cp``/``grad_checkpointing``
            (:mod:`apla_mm.memory.checkpointing`). Defaults to False.
        checkpoint_heads (bool): Activation checkpointing of the neck and the
            heads in small regions (each ``ConvModule``; UperNet's FPN fusion
            as one region), so that recomputing one region during backward
            does not bring the memory back
            (:mod:`apla_mm.memory.checkpointing`). Defaults to False.
        frozen_dtype (str, optional): ``'bfloat16'`` or ``'float16'``: store
            the frozen (``requires_grad=False``) weights of linear, conv and
            attention layers in this dtype, keeping fp32 masters for
            checkpoints. Training only, under AMP autocast of the same dtype
            (:mod:`apla_mm.memory.low_precision`). Defaults to None.
        fused_attention (bool): Run mmcv's/torch's ``nn.MultiheadAttention``
            (mmseg's ViT) through ``F.scaled_dot_product_attention`` instead
            of the explicit softmax that saves every attention matrix
            (:mod:`apla_mm.memory.fused_attention`). Defaults to False.
        lean_loss_chunk_mb (float): Size of one recomputed band of upsampled
            logits in MiB (float32), the transient memory of ``lean_loss``
            in forward and backward. Defaults to 32.
    """
    lean_loss: bool = False
    checkpoint_blocks: bool = False
    checkpoint_heads: bool = False
    frozen_dtype: Optional[str] = None
    fused_attention: bool = False
    lean_loss_chunk_mb: float = 32.0

    def __post_init__(self) -> None:
        for name in ('lean_loss', 'checkpoint_blocks', 'checkpoint_heads',
                     'fused_attention'):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f'MemoryConfig.{name} must be True or False, '
                                f'got {getattr(self, name)!r}.')
        if isinstance(self.frozen_dtype, torch.dtype):
            self.frozen_dtype = str(self.frozen_dtype).replace('torch.', '')
        if self.frozen_dtype is not None \
                and self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(
                f'frozen_dtype must be one of {FROZEN_DTYPES} or None, got '
                f'{self.frozen_dtype!r}.')
        if isinstance(self.lean_loss_chunk_mb, bool) or not isinstance(
                self.lean_loss_chunk_mb, (int, float)) \
                or self.lean_loss_chunk_mb <= 0:
            raise ValueError('lean_loss_chunk_mb must be a positive number '
                             f'of MiB, got {self.lean_loss_chunk_mb!r}.')

    @property
    def torch_frozen_dtype(self) -> Optional[torch.dtype]:
        """``frozen_dtype`` as a ``torch.dtype`` (None if unset)."""
        return None if self.frozen_dtype is None else getattr(
            torch, self.frozen_dtype)

    def to_dict(self) -> dict:
        return asdict(self)
