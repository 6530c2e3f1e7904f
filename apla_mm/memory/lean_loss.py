"""Lean segmentation loss: keep the low-resolution logits, recompute the rest.

mmseg's :meth:`BaseDecodeHead.loss_by_feat` upsamples the head's logits
(``B x classes x H/4 x W/4`` for UperNet) bilinearly to the label size and
applies its losses there; autograd then keeps full-resolution tensors for
backward (the upsampled logits, the log-softmax, ...): at 512² with 150
classes and batch 2, 157 MB each, for each head. With ``lean_loss`` the
head saves only its low-resolution logits and the labels. The loss is
computed in forward under ``no_grad``, and recomputed in backward, where its
gradient is pushed back through the upsampling, a band of output rows at a
time, so that the full-resolution logits never exist at once:

* **fast path** (every ``loss_decode`` a softmax
  :class:`mmseg.models.losses.CrossEntropyLoss`, ``reduction='mean'``, no
  class weights, no pixel sampler, the head's ``loss_by_feat`` mmseg's
  own): :class:`_BandedUpsampledCE` computes the sum of the per-pixel
  cross-entropies over non-ignored pixels band by band. The bilinear
  upsampling (``F.interpolate(mode='bilinear')``, ``align_corners`` as the
  head's) is separable and linear, ``up = A_h x A_w^T``; a band of output
  rows needs only the input rows its interpolation weights touch, and its
  gradient is ``A_h[band]^T g A_w``. Each loss is then
  ``loss_weight * sum / (count + eps)`` exactly as mmseg's
  ``cross_entropy`` + ``weight_reduce_loss`` (``count`` = all pixels, or
  the non-ignored ones with ``avg_non_ignore=True``), and ``acc_seg``
  follows mmseg's ``accuracy`` (top-1, ignore_index excluded). The band
  computations run in float32 whatever the logits' dtype (under AMP too);
  the gradient returned to the logits has their dtype.
* **general path** (any other loss, a sampler, or a head with its own
  ``loss_by_feat``): the head's original ``loss_by_feat`` runs inside a
  non-reentrant :func:`torch.utils.checkpoint.checkpoint`, which also
  saves only the logits (and recomputes the whole loss at once in
  backward).

Same losses and gradients as stock mmseg to float summation order
(``tests/test_memory_structural.py``, ``test_lean_loss_*``). Outside training (no grad, or
logits that need none) the head's original method runs.

Upstream: ``mmseg/models/decode_heads/decode_head.py`` (``loss_by_feat``),
``mmseg/models/losses/cross_entropy_loss.py``, ``accuracy.py``,
``utils.py`` (``weight_reduce_loss``); PyTorch's
``area_pixel_compute_source_index`` (``aten/src/ATen/native/UpSample.h``)
for the interpolation weights.
"""
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from apla_mm.peft.swap import (below, has_swap, register_swap, restore_class,
                               swap_class)

__all__ = [
    'interpolation_matrix', 'enable_lean_loss', 'disable_lean_loss',
    'find_decode_heads', 'lean_ce_eligible'
]

_EPS = torch.finfo(torch.float32).eps


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool,
                         device=None) -> torch.Tensor:
    """``(n_out, n_in)`` float32 matrix of 1-D linear interpolation with the
    source coordinates of ``F.interpolate(mode='bilinear')`` (PyTorch's
    ``area_pixel_compute_source_index`` when no scale factor is given)."""
    dst = torch.arange(n_out, dtype=torch.float64)
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        src = dst * scale
    else:
        src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    lam1 = src - i0.double()
    lam0 = 1.0 - lam1
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    mat.index_put_((rows, i0), lam0, accumulate=True)
    mat.index_put_((rows, i1), lam1, accumulate=True)
    return mat.float().to(device)


def _bands(a_h: torch.Tensor, rows_per_band: int):
    """``(r0, r1, h0, h1)``: output rows ``r0:r1`` need input rows
    ``h0:h1`` (the nonzero columns of ``a_h[r0:r1]``)."""
    nz = a_h != 0
    n_out = a_h.shape[0]
    cols = torch.arange(a_h.shape[1])
    for r0 in range(0, n_out, rows_per_band):
        r1 = min(n_out, r0 + rows_per_band)
        used = nz[r0:r1].any(0)
        idx = cols[used]
        yield r0, r1, int(idx.min()), int(idx.max()) + 1


class _BandedUpsampledCE(torch.autograd.Function):
    """Sum over non-ignored pixels of ``-log softmax(up(x))[label]`` where
    ``up`` is the bilinear upsampling to the label size; saves ``x`` and the
    labels only. Also returns (no gradient) the number of non-ignored pixels
    and of correct top-1 predictions among them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, label: torch.Tensor,
                align_corners: bool, ignore_index: int,
                band_bytes: int) -> Tuple[torch.Tensor, ...]:
        a_h, a_w, rows = _setup(logits, label, align_corners, band_bytes)
        x = logits.detach().float()
        total = x.new_zeros(())
        valid_count = x.new_zeros(())
        correct = x.new_zeros(())
        for r0, r1, h0, h1 in _bands(a_h, rows):
            up = _up_band(x, a_h, a_w, r0, r1, h0, h1)
            lbl = label[:, r0:r1]
            valid = lbl != ignore_index
            safe = torch.where(valid, lbl, torch.zeros_like(lbl))
            _check_labels(safe, up.shape[1])
            logp = torch.log_softmax(up, 1)
            nll = -logp.gather(1, safe.unsqueeze(1)).squeeze(1)
            total += nll.masked_fill(~valid, 0).sum()
            valid_count += valid.sum()
            correct += (up.argmax(1).eq(lbl) & valid).sum()
        ctx.save_for_backward(logits, label)
        ctx.align_corners = align_corners
        ctx.ignore_index = ignore_index
        ctx.band_bytes = band_bytes
        ctx.mark_non_differentiable(valid_count, correct)
        return total, valid_count, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_count, _grad_correct):
        logits, label = ctx.saved_tensors
        a_h, a_w, rows = _setup(logits, label, ctx.align_corners,
                                ctx.band_bytes)
        x = logits.detach().float()
        grad_x = torch.zeros_like(x)
        grad_total = grad_total.float()
        for r0, r1, h0, h1 in _bands(a_h, rows):
            up = _up_band(x, a_h, a_w, r0, r1, h0, h1)
            lbl = label[:, r0:r1]
            valid = lbl != ctx.ignore_index
            safe = torch.where(valid, lbl, torch.zeros_like(lbl))
            g = torch.softmax(up, 1)
            g.scatter_add_(1, safe.unsqueeze(1),
                           g.new_full(safe.unsqueeze(1).shape, -1.0))
            g.mul_((valid.unsqueeze(1) * grad_total).to(g.dtype))
            # adjoint of up = A_h[band] x[h0:h1] A_w^T
            g = g.matmul(a_w)
            grad_x[:, :, h0:h1] += a_h[r0:r1, h0:h1].t().matmul(g)
        return grad_x.to(logits.dtype), None, None, None, None


def _setup(logits, label, align_corners, band_bytes):
    n, c, h_in, w_in = logits.shape
    h_out, w_out = label.shape[-2:]
    a_h = interpolation_matrix(h_in, h_out, align_corners, logits.device)
    a_w = interpolation_matrix(w_in, w_out, align_corners, logits.device)
    # one band of upsampled float32 logits is about band_bytes
    rows = max(1, int(band_bytes // max(1, n * c * w_out * 4)))
    return a_h, a_w, rows


def _up_band(x, a_h, a_w, r0, r1, h0, h1):
    band = a_h[r0:r1, h0:h1].matmul(x[:, :, h0:h1])  # B, C, rb, W_in
    return band.matmul(a_w.t())  # B, C, rb, W_out


def _check_labels(safe: torch.Tensor, num_classes: int) -> None:
    if safe.numel() and (int(safe.max()) >= num_classes
                         or int(safe.min()) < 0):
        raise ValueError(
            f'lean_loss: labels outside [0, {num_classes}) that are not the '
            "head's ignore_index; fix the dataset's labels (reduce_zero_label"
            ', num_classes) or the head\'s ignore_index.')


# ----------------------------------------------------------------------
def find_decode_heads(model: nn.Module) -> Dict[str, nn.Module]:
    """mmseg decode heads of a model (``BaseDecodeHead`` instances, e.g.
    ``decode_head`` and every ``auxiliary_head``)."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, BaseDecodeHead)
    }


def _losses(head: nn.Module) -> List[nn.Module]:
    loss = head.loss_decode
    return list(loss) if isinstance(loss, nn.ModuleList) else [loss]


def lean_ce_eligible(head: nn.Module) -> bool:
    """Whether ``head`` takes the banded cross-entropy fast path."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.models.losses import CrossEntropyLoss
    if type(head).loss_by_feat is not BaseDecodeHead.loss_by_feat:
        return False
    if getattr(head, 'sampler', None) is not None:
        return False
    for loss in _losses(head):
        if type(loss) is not CrossEntropyLoss or loss.use_sigmoid \
                or loss.use_mask or loss.class_weight is not None \
                or loss.reduction != 'mean':
            return False
    return True


def _lean_ce_loss_by_feat(head, seg_logits, batch_data_samples,
                          band_bytes: int) -> dict:
    seg_label = head._stack_batch_gt(batch_data_samples).squeeze(1)
    total, valid, correct = _BandedUpsampledCE.apply(
        seg_logits, seg_label, head.align_corners, head.ignore_index,
        band_bytes)
    losses = {}
    for loss_decode in _losses(head):
        count = valid if loss_decode.avg_non_ignore else seg_label.numel()
        value = loss_decode.loss_weight * (total / (count + _EPS))
        name = loss_decode.loss_name
        losses[name] = losses[name] + value if name in losses else value
    # mmseg's accuracy: a 1-element tensor
    losses['acc_seg'] = ((correct + _EPS) * (100.0 / (valid + _EPS))).reshape(1)
    return losses


def _lean_loss_by_feat(self, seg_logits, batch_data_samples):
    original = below(self, LEAN_LOSS).loss_by_feat.__get__(self)
    if not (torch.is_grad_enabled() and seg_logits.requires_grad):
        return original(seg_logits, batch_data_samples)
    band_bytes = self.__dict__['_apla_mm_lean_band_bytes']
    if self.__dict__['_apla_mm_lean_fast']:
        return _lean_ce_loss_by_feat(self, seg_logits, batch_data_samples,
                                     band_bytes)
    return checkpoint(
        original, seg_logits, batch_data_samples, use_reentrant=False)


#: The head's ``loss_by_feat`` replaced by the lean one (a class swap,
#: :mod:`apla_mm.peft.swap`); its settings are plain attributes.
LEAN_LOSS = register_swap('memory.lean_loss', 'Lean',
                          {'loss_by_feat': _lean_loss_by_feat})


def enable_lean_loss(model: nn.Module, band_mb: float = 32.0) -> Dict[str,
                                                                      bool]:
    """Give every mmseg decode head of ``model`` the lean loss (in place).

    Returns:
        dict[str, bool]: Head name -> whether it takes the banded
        cross-entropy fast path (else the checkpointed original loss).

    Raises:
        ValueError: The model has no mmseg decode head.
    """
    heads = find_decode_heads(model)
    if not heads:
        raise ValueError(
            f'lean_loss: {type(model).__name__} has no mmseg decode head '
            '(BaseDecodeHead: decode_head/auxiliary_head of an '
            'EncoderDecoder); lean_loss applies to mmseg segmentors only. '
            'Set lean_loss=False for this model.')
    out = {}
    for name, head in heads.items():
        fast = lean_ce_eligible(head)
        if has_swap(head, LEAN_LOSS):
            continue
        head.__dict__['_apla_mm_lean_fast'] = fast
        head.__dict__['_apla_mm_lean_band_bytes'] = int(band_mb * 2**20)
        swap_class(head, LEAN_LOSS)
        out[name] = fast
    return out


def disable_lean_loss(model: nn.Module, names) -> None:
    """Undo :func:`enable_lean_loss`."""
    for name in names:
        head = model.get_submodule(name)
        restore_class(head, LEAN_LOSS)
        for key in ('_apla_mm_lean_fast', '_apla_mm_lean_band_bytes'):
            head.__dict__.pop(key, None)
