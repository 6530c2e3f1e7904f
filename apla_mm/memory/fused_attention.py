"""Attention through ``F.scaled_dot_product_attention`` (SDPA).

mmcv's ``MultiheadAttention`` (mmseg's ``VisionTransformer``) calls
``torch.nn.MultiheadAttention`` with the default ``need_weights=True``, so
:func:`torch.nn.functional.multi_head_attention_forward` takes its explicit
path: ``softmax(q k^T / sqrt(d))`` is materialised and saved for backward,
``B x heads x N x N`` per block (at 512² with ViT-B/16, batch 2: 1025
tokens, about 100 MB per block in float32). With ``need_weights=False`` the
same function calls ``F.scaled_dot_product_attention`` on the same
projected ``q, k, v`` (same math, same dropout probability), whose fused
kernels (CPU flash, CUDA flash/memory-efficient) save the output and a
log-sum-exp instead of the matrix. mmcv only uses the first return value
(the attention output), never the weights, so nothing else changes.

timm's ``Attention`` has a ``fused_attn`` switch (``TIMM_FUSED_ATTN``);
it is turned on where a model has it off.

Upstream: ``torch/nn/functional.py`` (``multi_head_attention_forward``),
``mmcv/cnn/bricks/transformer.py`` (``MultiheadAttention.forward``).
"""
from typing import List, Tuple

import torch.nn as nn

from apla_mm.peft.swap import (below, has_swap, register_swap, restore_class,
                               swap_class)

__all__ = ['enable_fused_attention', 'disable_fused_attention']


def _sdpa_forward(self, *args, **kwargs):
    # nn.MultiheadAttention.forward (also under a PEFT swap) without
    # weights. Callers that ask for the averaged weights explicitly keep
    # them.
    if kwargs.get('need_weights') is None:
        kwargs['need_weights'] = False
    return below(self, SDPA_MHA).forward(self, *args, **kwargs)


SDPA_MHA = register_swap('memory.sdpa_mha', 'SDPA',
                         {'forward': _sdpa_forward})


def enable_fused_attention(model: nn.Module) -> Tuple[List[str], List[str]]:
    """Make the model's attention run through SDPA (in place).

    Returns:
        tuple[list[str], list[str]]: Names of the ``nn.MultiheadAttention``
        modules switched to ``need_weights=False``, and of timm attention
        modules whose ``fused_attn`` was turned on.
    """
    mha, timm = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            if has_swap(module, SDPA_MHA):
                continue
            swap_class(module, SDPA_MHA)
            mha.append(name)
        elif getattr(module, 'fused_attn', None) is False \
                and hasattr(module, 'qkv'):
            module.fused_attn = True
            module.__dict__['_apla_mm_sdpa'] = True
            timm.append(name)
    return mha, timm


def disable_fused_attention(model: nn.Module, mha: List[str],
                            timm: List[str]) -> None:
    """Undo :func:`enable_fused_attention`."""
    for name in mha:
        restore_class(model.get_submodule(name), SDPA_MHA)
    for name in timm:
        module = model.get_submodule(name)
        module.fused_attn = False
        module.__dict__.pop('_apla_mm_sdpa', None)
