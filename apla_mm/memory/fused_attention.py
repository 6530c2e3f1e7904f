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

__all__ = ['enable_fused_attention', 'disable_fused_attention']


def _sdpa_forward(self, *args, **kwargs):
    # Instance attribute standing in for nn.MultiheadAttention.forward: the
    # class's own forward (also a PEFT-swapped subclass's) without weights.
    # Callers that ask for the averaged weights explicitly keep them.
    if kwargs.get('need_weights') is None:
        kwargs['need_weights'] = False
    return type(self).forward(self, *args, **kwargs)


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
            if '_apla_mm_sdpa' in module.__dict__:
                continue
            module.forward = _sdpa_forward.__get__(module)
            module.__dict__['_apla_mm_sdpa'] = True
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
        module = model.get_submodule(name)
        module.__dict__.pop('forward', None)
        module.__dict__.pop('_apla_mm_sdpa', None)
    for name in timm:
        module = model.get_submodule(name)
        module.fused_attn = False
        module.__dict__.pop('_apla_mm_sdpa', None)
