"""The mechanics of one APLA layer: trainable rows beside a frozen W_O.

For an adapted projection (``out x in`` weight, optional bias) APLA
registers on the module

* ``apla_index``: a non-persistent ``long`` buffer with the ``r`` selected
  output channels, sorted. It is created with the placeholder
  ``0 ... r-1`` and overwritten by the adapter's selection
  (:meth:`~apla_mm.peft.apla.APLAAdapter.set_indices`) before training;
  with ``selection='norm'`` that happens when training starts, once the
  pretrained weights are loaded;
* ``apla_weight`` (``r x in``) and ``apla_bias`` (``r``): the trainable
  rows, the only tensors the optimizer holds for this layer.

Which side is authoritative when:

* the module's own ``weight``/``bias`` stay frozen and always hold the
  **merged** values. Before training the rows are copied *from* them
  (``adapter.refresh_()``, after the weights were initialised or loaded); after
  every optimizer step the rows are copied *into* them (``sync_``, run by an
  optimizer step post-hook). So forward passes, ``state_dict()`` and
  checkpoints always see the plain model with the trained rows in place;
* during a step, the rows are what the optimizer changes; between the
  optimizer's ``step()`` and its post-hook nothing reads the weights.

How gradients reach the rows: the module's class is swapped
(:mod:`apla_mm.peft.swap`) for one whose ``weight``/``bias`` properties,
while a graph is recorded, return the frozen tensor itself through
:class:`RouteRows`, an identity whose backward hands the selected rows of
the gradient to ``apla_weight``/``apla_bias``. This works for layers called
as modules (timm, mmpretrain) and for ``nn.MultiheadAttention.out_proj``
(mmseg), whose owner only reads ``out_proj.weight``. A plain ``nn.Linear``
also gets a forward through :class:`RowLinear`, whose backward computes the
weight gradient for the ``r`` selected rows only (``r/out`` of the
weight-gradient work). With grad disabled (inference) the properties return
the plain parameters: nothing extra at inference.

State-dict hooks keep checkpoints plain: saving drops the rows (the merged
weight holds them); loading a plain checkpoint fills the rows from the
loaded weight's selected rows.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from apla_mm.compat import (register_load_state_dict_pre_hook,
                             register_state_dict_post_hook)
from ..base import AdaptedLayer
from ..swap import register_swap, restore_class, swap_class

ROW_PARAMS = ('apla_weight', 'apla_bias')
INDEX_BUFFER = 'apla_index'


class RouteRows(torch.autograd.Function):
    """Identity on the frozen tensor whose gradient goes to selected rows.

    Forward returns a view of ``base`` (the merged weight: no copy, nothing
    new saved for backward). Backward returns ``grad[index]`` for ``rows``.
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, rows: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return base.view_as(base)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        index, = ctx.saved_tensors
        return None, grad.index_select(0, index), None


class RowLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose backward gives gradients to the
    selected rows (``rows_w``/``rows_b``) and to ``x`` only.

    ``weight``/``bias`` are the frozen merged parameters (no gradient). The
    rows' gradient is computed from the selected output channels of the
    incoming gradient, ``r x in`` multiply-adds per token instead of the
    ``out x in`` that autograd spends on a full weight gradient. Saves ``x``
    (W_O's input, which attention backward keeps anyway) and the weight (a
    parameter): nothing new.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], rows_w: torch.Tensor,
                rows_b: Optional[torch.Tensor],
                index: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        # under autocast F.linear ran in the autocast dtype: so does backward
        ctx.compute_dtype = out.dtype
        ctx.save_for_backward(x, weight, index)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, index = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad = grad.to(dtype)
        grad_x = grad_rows_w = grad_rows_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(dtype)).to(x.dtype)
        selected = grad.index_select(-1, index).reshape(-1, index.numel())
        if ctx.needs_input_grad[3]:
            grad_rows_w = selected.t().matmul(
                x.to(dtype).reshape(-1, x.shape[-1]))
        if ctx.needs_input_grad[4]:
            grad_rows_b = selected.sum(0)
        return grad_x, None, None, grad_rows_w, grad_rows_b, None


def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    weight = self._parameters['weight']
    bias = self._parameters.get('bias')
    rows_w = self._parameters.get('apla_weight')
    rows_b = self._parameters.get('apla_bias')
    trains = any(p is not None and p.requires_grad for p in (rows_w, rows_b))
    if rows_w is None or not trains or not torch.is_grad_enabled():
        return F.linear(input, weight, bias)
    return RowLinear.apply(input, weight, bias, rows_w, rows_b,
                           self._buffers[INDEX_BUFFER])


def _routed(module: nn.Module, name: str, rows_name: str):
    base = module._parameters[name]
    rows = module._parameters.get(rows_name)
    if base is None or rows is None or not rows.requires_grad \
            or not torch.is_grad_enabled():
        return base
    return RouteRows.apply(base, rows, module._buffers[INDEX_BUFFER])


def _weight_property(self):
    return _routed(self, 'weight', 'apla_weight')


def _bias_property(self):
    return _routed(self, 'bias', 'apla_bias')


_PROPERTIES = {
    'weight': property(_weight_property),
    'bias': property(_bias_property),
}
#: Projections read by their owner (``nn.MultiheadAttention.out_proj``) or
#: with a forward of their own: the routing properties only.
APLA_ROUTED = register_swap('apla', 'APLA', _PROPERTIES)
#: Plain ``nn.Linear`` projections: the same, plus the row-only backward.
APLA_LINEAR = register_swap('apla.linear', 'APLA',
                            dict(_PROPERTIES, forward=_linear_forward))


def _drop_rows_from_state_dict(module, state_dict, prefix, local_metadata):
    # ``weight``/``bias`` already hold the merged values.
    for name in ROW_PARAMS:
        state_dict.pop(prefix + name, None)


def _rows_from_state_dict(module, state_dict, prefix, *args):
    # A plain checkpoint (or our own) provides the merged ``weight``; the
    # trainable rows are its selected rows.
    index = module._buffers[INDEX_BUFFER]
    for name, rows in zip(('weight', 'bias'), ROW_PARAMS):
        key = prefix + name
        if key in state_dict and prefix + rows not in state_dict \
                and module._parameters.get(rows) is not None:
            value = state_dict[key]
            if value.shape != module._parameters[name].shape:
                # another width: leave it to load_state_dict, which reports
                # the shape mismatch (and apla_mm's load guard with it)
                continue
            state_dict[prefix + rows] = value.index_select(
                0, index.to(value.device))


@dataclass
class APLALayer(AdaptedLayer):
    """One adapted projection."""
    has_bias: bool = True
    #: Whether every channel trains (``rank='full'``: W_O itself trains).
    full: bool = False
    #: Channels trained in this layer (:func:`~.config.layer_rank`).
    target_rank: int = 0

    @property
    def index(self) -> Optional[torch.Tensor]:
        """The selected channels (``None`` for ``rank='full'``)."""
        return None if self.full else self.module._buffers[INDEX_BUFFER]

    @property
    def rank(self) -> int:
        return self.out_features if self.full else int(self.index.numel())

    def trainable_parameters(self) -> List[nn.Parameter]:
        m = self.module
        names = ('weight', 'bias') if self.full else ROW_PARAMS
        return [p for p in (m._parameters.get(n) for n in names)
                if p is not None]


def inject(layer: APLALayer, hooks: dict) -> None:
    """Add the rows, the routing class and the state-dict hooks to a layer
    (``rank='full'``: just make W_O trainable). Hook handles go to
    ``hooks``."""
    m = layer.module
    weight = m._parameters['weight']
    bias = m._parameters.get('bias')
    if layer.full:
        weight.requires_grad_(True)
        if bias is not None:
            bias.requires_grad_(True)
        return
    rank = layer.target_rank
    m.register_buffer(INDEX_BUFFER, torch.arange(rank, device=weight.device),
                      persistent=False)
    m.register_parameter('apla_weight',
                         nn.Parameter(weight.detach()[:rank].clone()))
    if bias is not None:
        m.register_parameter('apla_bias',
                             nn.Parameter(bias.detach()[:rank].clone()))
    plain_linear = isinstance(m, nn.Linear) \
        and type(m).forward is nn.Linear.forward
    swap_class(m, APLA_LINEAR if plain_linear else APLA_ROUTED)
    hooks[layer.name + ':save'] = \
        register_state_dict_post_hook(m, _drop_rows_from_state_dict)
    hooks[layer.name + ':load'] = \
        register_load_state_dict_pre_hook(m, _rows_from_state_dict)


def eject(layer: APLALayer) -> None:
    """Undo :func:`inject` (hooks are removed by the adapter)."""
    if layer.full:
        return
    m = layer.module
    restore_class(m)
    for name in ROW_PARAMS:
        m._parameters.pop(name, None)
    m._buffers.pop(INDEX_BUFFER, None)


@torch.no_grad()
def _copy_rows_(layer: APLALayer, into_weights: bool) -> None:
    if layer.full:
        return
    m = layer.module
    index = m._buffers[INDEX_BUFFER]
    for name, rows in zip(('weight', 'bias'), ROW_PARAMS):
        if m._parameters.get(rows) is None:
            continue
        merged, trainable = m._parameters[name], m._parameters[rows]
        if into_weights:
            merged.index_copy_(0, index, trainable.to(merged.dtype))
        else:
            trainable.copy_(merged.index_select(0, index))


def rows_to_weights_(layer: APLALayer) -> None:
    """Copy the trainable rows into the frozen merged weights."""
    _copy_rows_(layer, into_weights=True)


def weights_to_rows_(layer: APLALayer) -> None:
    """Copy the selected rows of the weights into the trainable rows."""
    _copy_rows_(layer, into_weights=False)
