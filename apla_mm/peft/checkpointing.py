"""Activation checkpointing of the blocks a PEFT method adapts (``with_cp``).

One switch, the method config's ``with_cp``, recomputes in backward every
transformer block holding an adapted layer (the block found by
:func:`~apla_mm.peft.targets.enclosing_block`) with non-reentrant
:func:`torch.utils.checkpoint.checkpoint`. Why apla_mm has its own rather
than using each backbone's:

* it works on every backbone the methods support, including those that have
  no switch of their own or no switch per block;
* it is non-reentrant. Reentrant checkpointing (mmcv's and mmseg's/mmdet's
  ``cp.checkpoint(_inner_forward, x)`` in ViT and Swin blocks) gives the
  parameters inside a block gradients only if the block's *input* requires
  grad. In a frozen backbone the input of the first blocks does not, so
  those backbones skip checkpointing there (``if self.with_cp and
  x.requires_grad``) and keep that block's activations; a reentrant
  checkpoint that did not skip would silently drop the gradient of APLA's
  rows or LoRA's factors inside it. Non-reentrant checkpointing has neither
  problem: every block is recomputed and every trainable tensor gets its
  gradient.

Both switches at once would recompute a block twice (the outer recompute runs
the inner checkpoint again), so :func:`enable_block_checkpointing` refuses a
block that its backbone already checkpoints (``with_cp`` on the block, as in
mmseg/mmdet, or timm's ``grad_checkpointing`` on the model around it) and
says which switch to turn off.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .swap import base_class, register_swap, restore_class, swap_class
from .targets import enclosing_block


def _checkpointed_forward(self, *args, **kwargs):
    forward = base_class(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


CHECKPOINTED = register_swap('checkpointed', 'Checkpointed',
                             {'forward': _checkpointed_forward})


def own_checkpointing(model: nn.Module, block: str) -> str:
    """Where the backbone already checkpoints ``block``: the name of the
    switch that is on (``''`` if none)."""
    module = model.get_submodule(block)
    if getattr(module, 'with_cp', False) is True:
        return f'{block}.with_cp'
    parts = block.split('.')
    for end in range(len(parts) - 1, -1, -1):
        name = '.'.join(parts[:end])
        owner = model.get_submodule(name) if name else model
        if getattr(owner, 'grad_checkpointing', False) is True:
            return f'{name or type(model).__name__}.grad_checkpointing'
    return ''


def enable_block_checkpointing(model: nn.Module,
                               layer_names: Sequence[str]) -> List[str]:
    """Recompute, in backward, the transformer blocks holding these layers.

    Returns:
        list[str]: Names of the checkpointed blocks.

    Raises:
        ValueError: if a layer is in no block, or the backbone already
            checkpoints a block (see the module docstring).
    """
    blocks: List[str] = []
    for name in layer_names:
        block = enclosing_block(name)
        if block not in blocks:
            blocks.append(block)
    for block in blocks:
        switch = own_checkpointing(model, block)
        if switch:
            raise ValueError(
                f'with_cp=True would recompute {block} twice: the backbone '
                f'checkpoints it already ({switch} is True). Turn one of '
                'the two off: drop with_cp from the PEFT hook, or set the '
                "backbone's with_cp=False (recommended: the hook's "
                'checkpointing also covers blocks whose input needs no '
                'gradient).')
    for block in blocks:
        swap_class(model.get_submodule(block), CHECKPOINTED)
    return blocks


def disable_block_checkpointing(model: nn.Module,
                                blocks: Sequence[str]) -> None:
    """Undo :func:`enable_block_checkpointing`."""
    for name in blocks:
        restore_class(model.get_submodule(name))
