"""META's memory-efficient adapter (MEA) block and its cascaded form.

Our reading of Fig. 2 of META (Zhang et al., "Memory Efficient Transformer
Adapter for Dense Predictions", ICLR 2025, arXiv 2502.01962; no official
code). An MEA block takes a *query stream* ``x`` and a *key/value stream*
``y`` (``(B, H, W, d)`` each, on the same grid) and returns an update of the
query stream::

    z = [x, y]                          # the figure's bus (channel concat)
    n = SharedNorm(z)                   # ONE norm, read by attention and FFN
    A = CSA(Q = n_x W_q, K, V = n_y W_kv) W_proj      # cross-shaped attn
    M = W_2 GELU(W_1 n)                               # FFN ("MLP layers")
    C = DW_3(GELU(DW_2(GELU(DW_1(z)))))               # conv branch, no norm
    out = W_fuse [z, A, M, C]           # channel-wise concat & projection

The cascaded MEA (C-MEA) splits the channels of both streams into
``num_cascades`` chunks, one MEA ("head") per chunk, and adds each head's
output to the next head's query input, as in the cascaded group attention of
EfficientViT (Liu et al., CVPR 2023); the head outputs are concatenated and
projected.

Memory-saving implementation details (none changes the function):

* The bus ``z`` and the normalised bus ``n`` are never materialised. Every
  layer that reads them is either per channel (the norm, whose statistics
  are per stream anyway, and the depthwise convs) or linear (``W_1``,
  ``W_fuse``), and a linear map of a concatenation is the sum of the maps
  of the parts with the matching weight columns. Parameters keep the shapes
  of the concatenated form (``fc1.weight``: ``(hidden, 2d)``,
  ``fuse.weight``: ``(d, 6d)``), so checkpoints are those of the literal
  implementation. This saves the concat copies and keeps only tensors that
  exist anyway for backward.
* The key/value stream does not take part in the cascade, so its
  normalisation and its half of the conv branch run once, on the un-split
  stream (with the heads' depthwise kernels stacked), instead of once per
  head on strided channel slices (which would copy).
* Maps stay channel-last (``(B, H, W, C)`` = token order); the depthwise
  convs read them as ``channels_last`` NCHW views, so no layout copies.
* ``recompute_conv`` (default on): the conv branch keeps only its input
  for backward and recomputes its four intermediate maps per stream there
  (depthwise convs and GELUs are cheap); on ViT-B at 512x512 this cuts the
  adapter's stored activations by ~190 MiB per image.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .cross_shaped_attention import CrossShapedAttention

__all__ = ['MEABlock', 'CascadedMEA', 'concat_linear', 'depthwise_chain']


def concat_linear(inputs: Sequence[torch.Tensor], weight: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(torch.cat(inputs, -1), weight, bias)`` without the concat.

    Args:
        inputs (Sequence[Tensor]): Tensors ``(..., c_i)`` with the same
            leading shape; strided views are fine.
        weight (Tensor): ``(out, sum(c_i))``.
        bias (Tensor, optional): ``(out, )``.

    Returns:
        Tensor: ``(..., out)``.
    """
    offset = 0
    out = None
    for t in inputs:
        c = t.shape[-1]
        part = F.linear(t, weight[:, offset:offset + c])
        out = part if out is None else out + part
        offset += c
    if offset != weight.shape[1]:
        raise ValueError(f'concat_linear: inputs have {offset} channels, the '
                         f'weight expects {weight.shape[1]}.')
    return out if bias is None else out + bias


def _depthwise_chain(x: torch.Tensor, act: nn.Module, num: int, *params:
                     Optional[torch.Tensor]) -> torch.Tensor:
    t = x.permute(0, 3, 1, 2)  # a channels_last NCHW view when x is dense
    for i in range(num):
        w, b = params[i], params[num + i]
        if i:
            t = act(t)
        t = F.conv2d(t, w, b, padding=w.shape[-1] // 2, groups=w.shape[0])
    return t.permute(0, 2, 3, 1)


def depthwise_chain(x: torch.Tensor,
                    weights: Sequence[torch.Tensor],
                    biases: Sequence[Optional[torch.Tensor]],
                    act: nn.Module,
                    recompute: bool = False) -> torch.Tensor:
    """Depthwise conv, activation, ..., depthwise conv on a channel-last map.

    Args:
        x (Tensor): ``(B, H, W, C)``.
        weights (Sequence[Tensor]): Depthwise kernels ``(C, 1, k, k)``,
            odd ``k``, 'same' zero padding.
        biases (Sequence[Tensor | None]): Their biases ``(C, )``.
        act (nn.Module): Activation between consecutive convs.
        recompute (bool): Keep only ``x`` for backward and recompute the
            intermediate maps there (the chain is cheap; its intermediates
            are ``2 * len(weights) - 2`` full maps). Defaults to False.

    Returns:
        Tensor: ``(B, H, W, C)``.
    """
    if len(weights) != len(biases):
        raise ValueError('depthwise_chain needs one bias (or None) per '
                         'kernel.')
    args = (x, act, len(weights), *weights, *biases)
    if recompute and torch.is_grad_enabled():
        return checkpoint(_depthwise_chain, *args, use_reentrant=False)
    return _depthwise_chain(*args)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class MEABlock(nn.Module):
    """One MEA block: updates a query stream from a key/value stream.

    See the module docstring for the computation. The **shared norm** is a
    single LayerNorm over the bus ``[x, y]``, computed once and read by both
    the attention and the FFN branch (META's memory-access saving). Its
    statistics are taken per stream (per half of the bus), because the ViT
    tokens grow in magnitude with depth and statistics over both streams
    would drown the adapter stream; it has no affine parameters, since only
    linear layers read it and they absorb any affine map.

    Args:
        dim (int): Channels ``d`` of each stream.
        num_heads (int): Attention heads of the cross-shaped attention
            (even). Defaults to 2.
        stripe_width (int): Stripe width of the cross-shaped attention.
            Defaults to 8.
        mlp_ratio (float): FFN hidden width as a multiple of ``dim``.
            Defaults to 1.
        conv_kernel_size (int): Kernel of the three depthwise convs of the
            conv branch (odd). Defaults to 3.
        qkv_bias (bool): Bias in the attention projections. Defaults to True.
        norm_eps (float): Epsilon of the shared norm. Defaults to 1e-6.
        recompute_conv (bool): Recompute the conv branch's intermediate maps
            in backward instead of storing them (4 of the block's ~24 stored
            maps per stream; depthwise convs are cheap). Defaults to True.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int = 2,
                 stripe_width: int = 8,
                 mlp_ratio: float = 1.0,
                 conv_kernel_size: int = 3,
                 qkv_bias: bool = True,
                 norm_eps: float = 1e-6,
                 recompute_conv: bool = True) -> None:
        super().__init__()
        if conv_kernel_size % 2 != 1:
            raise ValueError('conv_kernel_size must be odd, got '
                             f'{conv_kernel_size}.')
        self.dim = dim
        self.norm_eps = norm_eps
        self.recompute_conv = recompute_conv
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.attn = CrossShapedAttention(
            dim,
            num_heads=num_heads,
            stripe_width=stripe_width,
            qkv_bias=qkv_bias)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.convs = nn.ModuleList(
            nn.Conv2d(
                2 * dim,
                2 * dim,
                conv_kernel_size,
                padding=conv_kernel_size // 2,
                groups=2 * dim) for _ in range(3))
        self.fuse = nn.Linear(6 * dim, dim)

    def conv_params(self, stream: int):
        """Depthwise kernels and biases of the conv branch for the query
        (``stream=0``) or the key/value (``stream=1``) half of the bus."""
        sl = slice(stream * self.dim, (stream + 1) * self.dim)
        return ([c.weight[sl] for c in self.convs],
                [None if c.bias is None else c.bias[sl] for c in self.convs])

    def forward(self,
                x: torch.Tensor,
                y: torch.Tensor,
                y_norm: Optional[torch.Tensor] = None,
                y_conv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Update the query stream.

        Args:
            x (Tensor): Query stream ``(B, H, W, d)``.
            y (Tensor): Key/value stream ``(B, H, W, d)``, same grid.
            y_norm (Tensor, optional): ``y``'s half of the shared norm, if
                the caller computed it already (:class:`CascadedMEA`).
            y_conv (Tensor, optional): ``y``'s half of the conv branch, if
                the caller computed it already.

        Returns:
            Tensor: ``(B, H, W, d)``.
        """
        if y.shape[:3] != x.shape[:3]:
            raise ValueError('MEABlock needs both streams on one grid, got '
                             f'{tuple(x.shape)} and {tuple(y.shape)}.')
        x_norm = _layer_norm(x, self.norm_eps)
        if y_norm is None:
            y_norm = _layer_norm(y, self.norm_eps)
        a = self.attn(x_norm, y_norm)
        m = self.fc2(
            self.act(
                concat_linear((x_norm, y_norm), self.fc1.weight,
                              self.fc1.bias)))
        x_conv = depthwise_chain(x, *self.conv_params(0), self.act,
                                 self.recompute_conv)
        if y_conv is None:
            y_conv = depthwise_chain(y, *self.conv_params(1), self.act,
                                     self.recompute_conv)
        return concat_linear((x, y, a, m, x_conv, y_conv), self.fuse.weight,
                             self.fuse.bias)


class CascadedMEA(nn.Module):
    """Cascaded MEA (C-MEA): META's injector and extractor.

    Both streams are split along channels into ``num_cascades`` chunks of
    ``d = dim / num_cascades``. Head ``h`` (an :class:`MEABlock` of width
    ``d``) reads query chunk ``h`` plus head ``h-1``'s output (the cascade)
    and key/value chunk ``h``; all head outputs are concatenated and
    projected back to ``dim``. Only the query stream cascades: the
    key/value chunks are read as they are.

    Args:
        dim (int): Channels of both streams.
        num_cascades (int): Heads of the cascade; must divide ``dim``.
            Defaults to 8.
        **block_kwargs: The arguments of each head's :class:`MEABlock`
            (``num_heads``, ``stripe_width``, ``mlp_ratio``,
            ``conv_kernel_size``, ``qkv_bias``, ``norm_eps``,
            ``recompute_conv``), with its defaults.
    """

    def __init__(self, dim: int, num_cascades: int = 8,
                 **block_kwargs) -> None:
        super().__init__()
        if num_cascades < 1 or dim % num_cascades:
            raise ValueError(f'num_cascades={num_cascades} must divide '
                             f'dim={dim}.')
        self.dim = dim
        self.num_cascades = num_cascades
        self.head_dim = dim // num_cascades
        self.heads = nn.ModuleList(
            MEABlock(self.head_dim, **block_kwargs)
            for _ in range(num_cascades))
        self.norm_eps = self.heads[0].norm_eps
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Update of the query stream ``x`` ``(B, H, W, dim)`` from ``y``
        ``(B, H, W, dim)``; returns ``(B, H, W, dim)`` (not added to ``x``;
        the caller decides how, see :class:`METAAdapterViT`)."""
        B, H, W, D = x.shape
        if y.shape != x.shape:
            raise ValueError('CascadedMEA needs streams of equal shape, got '
                             f'{tuple(x.shape)} and {tuple(y.shape)}.')
        d = self.head_dim
        # Shared-norm and conv-branch halves of the key/value stream, once
        # for all heads (no per-head strided copies).
        y = y.contiguous()
        y_norm = _layer_norm(
            y.view(B, H, W, self.num_cascades, d),
            self.norm_eps).view(B, H, W, D)
        per_head = [h.conv_params(1) for h in self.heads]
        weights = [torch.cat([w[i] for w, _ in per_head]) for i in range(3)]
        biases = [torch.cat([b[i] for _, b in per_head]) for i in range(3)]
        y_conv = depthwise_chain(y, weights, biases, self.heads[0].act,
                                 self.heads[0].recompute_conv)

        outs: List[torch.Tensor] = []
        prev: Optional[torch.Tensor] = None
        for i, head in enumerate(self.heads):
            sl = slice(i * d, (i + 1) * d)
            q = x[..., sl]
            q = q.contiguous() if prev is None else q + prev
            prev = head(q, y[..., sl], y_norm[..., sl], y_conv[..., sl])
            outs.append(prev)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return self.proj(out)
