"""Which ``scaled_dot_product_attention`` kernel the account runs.

``F.scaled_dot_product_attention`` (timm's ViT attention, and mmseg's ViT
with ``fused_attention``) picks a kernel at run time, by device, dtype and
shapes, and the kernels save different tensors for backward:

==============  =========================================================
``math``        the explicit composition: ``q k^T``, softmax, dropout,
                ``@ v``; saves the ``N x N`` attention matrix per head
                (and its scaled inputs)
``flash-cpu``   torch's CPU flash kernel
                (``_scaled_dot_product_flash_attention_for_cpu``): saves
                q, k, v, the output and the log-sum-exp (``B x N x H``
                float32)
``flash``       CUDA FlashAttention-2 (``_scaled_dot_product_flash_
                attention``, fp16/bf16 only): q, k, v, output, log-sum-exp,
                the dropout RNG state
``efficient``   CUDA memory-efficient attention (``_scaled_dot_product_
                efficient_attention``, also fp32): q, k, v, output,
                log-sum-exp padded to 32 queries, RNG state
``cudnn``       cuDNN attention (``_scaled_dot_product_cudnn_attention``)
==============  =========================================================

``auto`` leaves the choice to torch on the device the account runs on (a
CPU here: ``flash-cpu`` for the ViTs). The CUDA kernels cannot run on a
CPU, but their meta functions can: with the abstract account (fake
tensors) every backend can be counted on any machine, which is how a GPU
run is planned from here (a real CPU account accepts ``auto``, ``math`` and
``flash-cpu``).

On a GPU, what torch picks by default for these ViTs (head dim 64-128, no
mask): fp32 inputs run ``efficient``, fp16/bf16 inputs ``flash`` (see
``torch.nn.attention.sdpa_kernel``, and
``torch/_C/_nn.scaled_dot_product_attention``'s dispatch in
``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``).
"""
from typing import Optional

import torch

from apla_mm.compat import cpu_flash_attention, routed_sdpa

__all__ = ['SDPA_BACKENDS', 'SDPABackend', 'check_backend']

SDPA_BACKENDS = ('auto', 'math', 'flash-cpu', 'flash', 'efficient', 'cudnn')
_CUDA_ONLY = ('flash', 'efficient', 'cudnn')


def check_backend(backend: str, device: str, abstract: bool) -> str:
    """Validate a backend name for a device; returns it.

    Raises:
        ValueError: unknown name, or a CUDA kernel for a real CPU account.
    """
    if backend not in SDPA_BACKENDS:
        raise ValueError(f'unknown SDPA backend {backend!r}; choose one of '
                         f'{SDPA_BACKENDS}.')
    dev = torch.device(device).type
    if backend in _CUDA_ONLY and dev != 'cuda' and not abstract:
        raise ValueError(
            f'SDPA backend {backend!r} is a CUDA kernel and cannot run on '
            f'{device}; count it with the abstract account (--abstract, fake '
            'tensors, any machine) or run on --device cuda, or use auto, math '
            'or flash-cpu here.')
    if backend == 'flash-cpu' and dev == 'cuda':
        raise ValueError("SDPA backend 'flash-cpu' runs on CPU tensors only; "
                         "on CUDA use 'flash', 'efficient', 'cudnn' or "
                         "'math'.")
    return backend


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return scale if scale is not None else q.shape[-1]**-0.5


class SDPABackend:
    """Route every ``F.scaled_dot_product_attention`` call to one kernel.

    A context manager that replaces ``torch.nn.functional.
    scaled_dot_product_attention`` while it is active, through
    :func:`apla_mm.compat.routed_sdpa` (the one global touch, and why).

    Args:
        backend (str): One of :data:`SDPA_BACKENDS`; ``'auto'`` changes
            nothing.
    """

    def __init__(self, backend: str = 'auto') -> None:
        if backend not in SDPA_BACKENDS:
            raise ValueError(f'unknown SDPA backend {backend!r}; choose one '
                             f'of {SDPA_BACKENDS}.')
        self.backend = backend
        self.calls = 0
        self._context = None

    def _routed(self, *args, **kwargs):
        self.calls += 1
        return self._run(*args, **kwargs)

    def __enter__(self) -> 'SDPABackend':
        if self.backend != 'auto':
            self._context = routed_sdpa(self._routed)
            self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)
            self._context = None

    def _run(self, query, key, value, attn_mask=None, dropout_p=0.0,
             is_causal=False, scale=None, enable_gqa=False):
        aten = torch.ops.aten
        if enable_gqa:
            raise ValueError('SDPABackend: enable_gqa is not supported; use '
                             "backend='auto'.")
        scale = _scale(query, scale)
        b = self.backend
        if b == 'math':
            return aten._scaled_dot_product_attention_math(
                query, key, value, attn_mask, dropout_p, is_causal,
                scale=scale)[0]
        if attn_mask is not None and b in ('flash', 'flash-cpu'):
            raise ValueError(f'SDPA backend {b!r} takes no attention mask; '
                             "use 'efficient', 'math' or 'auto'.")
        if b == 'flash-cpu':
            return cpu_flash_attention(query, key, value, dropout_p,
                                       is_causal, scale)
        if b == 'flash':
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False,
                scale=scale)[0]
        if b == 'efficient':
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal,
                scale=scale)[0]
        # cudnn
        return aten._scaled_dot_product_cudnn_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, False,
            scale=scale)[0]
