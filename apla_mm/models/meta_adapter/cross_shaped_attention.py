"""Cross-shaped (stripe) attention between two token maps on one grid.

The attention of the CSWin Transformer (Dong et al., "CSWin Transformer: A
General Vision Transformer Backbone with Cross-Shaped Windows", CVPR 2022):
half of the heads attend within horizontal stripes (``stripe_width`` rows
across the whole width), the other half within vertical stripes
(``stripe_width`` columns across the whole height); together a token sees a
cross around itself. META (Zhang et al., ICLR 2025, arXiv 2502.01962) uses it
as the attention of its MEA blocks, between a query stream and a key/value
stream that lie on the same grid.

Layout: every map is channel-last, ``(B, H, W, C)``, which is what a
token sequence ``(B, H*W, C)`` already is, so the linear layers, the
stripe partition of horizontal stripes and the write-back of the results are
views; only vertical stripes (and a remainder stripe, see below) need a
gather copy for the attention kernel. Attention itself runs through
:func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels, no
stored attention matrix where the backend allows it).

Grids that are not multiples of ``stripe_width``: the last stripe is
narrower (``H % stripe_width`` rows or ``W % stripe_width`` columns) and is
attended separately, so there is neither padding nor a mask. A stripe width
of at least the grid size gives full attention along that direction.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['cross_shaped_attention', 'CrossShapedAttention']


def _stripe_spans(size: int, width: int):
    """``(start, stop, stripe width)`` of the full stripes and the rest."""
    main = (size // width) * width
    spans = []
    if main:
        spans.append((0, main, width))
    if main < size:
        spans.append((main, size, size - main))
    return spans


def _row_stripes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, heads: int, width: int,
                 dropout_p: float) -> None:
    """Attention within stripes of ``width`` rows of ``(B, H, W, C)`` maps;
    writes into ``out``. Column stripes are row stripes of the transposed
    maps (views): attention does not depend on the order of the tokens
    inside a stripe."""
    B, H, W, C = q.shape
    hd = C // heads
    for start, stop, w in _stripe_spans(H, width):
        n = (stop - start) // w

        def split(t: torch.Tensor) -> torch.Tensor:
            # (B, rows, W, C) -> (B*n, heads, w*W, hd); a view when the
            # stripes cover all rows of a contiguous map, a copy otherwise.
            return t[:, start:stop].reshape(B * n, w * W, heads,
                                            hd).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            split(q), split(k), split(v), dropout_p=dropout_p)
        out[:, start:stop].copy_(
            o.transpose(1, 2).reshape(B, stop - start, W, C))


def cross_shaped_attention(q: torch.Tensor,
                           k: torch.Tensor,
                           v: torch.Tensor,
                           num_heads: int,
                           stripe_width: int,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head cross-shaped attention of channel-last maps.

    Heads ``[0, num_heads // 2)`` (channels ``[0, C/2)``) attend within
    horizontal stripes of ``stripe_width`` rows, heads
    ``[num_heads // 2, num_heads)`` within vertical stripes of
    ``stripe_width`` columns. Scores are scaled by ``head_dim ** -0.5``.

    Args:
        q (Tensor): Queries, ``(B, H, W, C)``.
        k (Tensor): Keys, ``(B, H, W, C)`` on the same grid.
        v (Tensor): Values, ``(B, H, W, C)``.
        num_heads (int): Heads, even, dividing ``C``.
        stripe_width (int): Stripe width in tokens.
        dropout_p (float): Attention dropout probability.

    Returns:
        Tensor: ``(B, H, W, C)``, contiguous, heads concatenated along ``C``.
    """
    B, H, W, C = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            'cross_shaped_attention needs q, k and v on the same grid with '
            f'the same width, got {tuple(q.shape)}, {tuple(k.shape)}, '
            f'{tuple(v.shape)}.')
    if num_heads < 2 or num_heads % 2 or C % num_heads:
        raise ValueError(f'num_heads must be even and divide {C} channels, '
                         f'got {num_heads}.')
    half, heads = C // 2, num_heads // 2
    out = q.new_empty(B, H, W, C)
    _row_stripes(q[..., :half], k[..., :half], v[..., :half],
                 out[..., :half], heads, stripe_width, dropout_p)
    _row_stripes(*(t[..., half:].transpose(1, 2) for t in (q, k, v, out)),
                 heads, stripe_width, dropout_p)
    return out


class CrossShapedAttention(nn.Module):
    """Cross-shaped multi-head attention from a query map to a key/value map.

    Queries come from ``x``, keys and values from ``context`` (``x`` itself
    when omitted, i.e. CSWin's self-attention); both are channel-last maps
    on the same grid. Unlike CSWin there is no LePE positional term: in META
    the local/positional bias comes from the MEA's depthwise-convolution
    branch, and the ViT tokens carry their absolute position embedding.

    Args:
        dim (int): Query (and output) channels.
        num_heads (int): Heads (even: half horizontal, half vertical).
            Defaults to 2.
        stripe_width (int): Stripe width in tokens. Defaults to 7 (CSWin's
            width at stride 16).
        context_dim (int, optional): Channels of ``context``; ``dim`` if
            None.
        qkv_bias (bool): Bias in the query and key/value projections.
            Defaults to True.
        attn_drop (float): Attention dropout. Defaults to 0.
    """

    def __init__(self,
                 dim: int,
                 num_heads: int = 2,
                 stripe_width: int = 7,
                 context_dim: Optional[int] = None,
                 qkv_bias: bool = True,
                 attn_drop: float = 0.0) -> None:
        super().__init__()
        if num_heads < 2 or num_heads % 2 or dim % num_heads:
            raise ValueError(
                f'CrossShapedAttention: num_heads={num_heads} must be even '
                f'(half horizontal, half vertical) and divide dim={dim}.')
        if stripe_width < 1:
            raise ValueError(f'stripe_width must be >= 1, got {stripe_width}')
        self.dim = dim
        self.num_heads = num_heads
        self.stripe_width = stripe_width
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self,
                x: torch.Tensor,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``x`` ``(B, H, W, C)`` to ``context``
        ``(B, H, W, C_ctx)``; returns ``(B, H, W, C)``."""
        if context is None:
            context = x
        if context.shape[:3] != x.shape[:3]:
            raise ValueError(
                'CrossShapedAttention needs query and context maps on the '
                f'same grid, got {tuple(x.shape)} and {tuple(context.shape)}.')
        q = self.q(x)
        k, v = self.kv(context).chunk(2, dim=-1)
        out = cross_shaped_attention(q, k, v, self.num_heads,
                                     self.stripe_width,
                                     self.attn_drop if self.training else 0.0)
        return self.proj(out)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, '
                f'stripe_width={self.stripe_width}')
