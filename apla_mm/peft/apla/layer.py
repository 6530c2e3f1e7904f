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

* the module's own ``weight``/``bias`` stay frozen and hold the **merged**
  values whenever something reads them: forward passes, ``state_dict()``
  and checkpoints see the plain model with the trained rows in place;
* the rows are what the optimizer changes.

The two sides are kept in step by the layer itself, whoever changes one of
them: every read (the swapped forward and ``weight``/``bias`` properties,
``state_dict()``) first compares the tensors' version counters with those of
the last copy (:func:`consistent_`). Rows changed since (an optimizer step,
with or without ``adapter.attach_optimizer``): they are copied *into* the
weights. Weights changed and rows not (initialised or loaded in place): the
rows are copied *from* them. Eagerly, ``adapter.sync_()`` (what the optimizer
step post-hook of ``attach_optimizer`` calls) and ``adapter.refresh_()`` do
the same. So ``optimizer.step()`` can never leave W_O stale, under any
optimizer, wrapper or sharding (under FSDP the parameters are complete only
in forward, where the copy then happens).

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
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from apla_mm.compat import (holds_values,
                             register_load_state_dict_pre_hook,
                             register_state_dict_post_hook)
from ..base import AdaptedLayer
from ..swap import (managed_by_fsdp, own_tensor, parameter_property,
                    register_swap, restore_class, swap_class)

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
    weight = own_tensor(self, 'weight')
    bias = own_tensor(self, 'bias')
    rows_w = own_tensor(self, 'apla_weight')
    rows_b = own_tensor(self, 'apla_bias')
    trains = any(p is not None and p.requires_grad for p in (rows_w, rows_b))
    if managed_by_fsdp(self, 'weight'):
        return F.linear(input, _merged(self, 'weight', 'apla_weight'),
                        _merged(self, 'bias', 'apla_bias'))
    consistent_(self)
    if rows_w is None or not trains or not torch.is_grad_enabled():
        return F.linear(input, weight, bias)
    return RowLinear.apply(input, weight, bias, rows_w, rows_b,
                           self._buffers[INDEX_BUFFER])


def _merged(module: nn.Module, name: str, rows_name: str):
    """Under FSDP: the weight with the rows put in, out of place. FSDP
    gathers each weight from its shards around forward and again before
    backward, and only the rows are trained tensors there, so the merged
    weight is rebuilt from them (a W_O-sized copy, saved for backward)
    instead of written into a gathered view that resharding discards."""
    base, rows = own_tensor(module, name), own_tensor(module, rows_name)
    index = module._buffers[INDEX_BUFFER]
    if not _fits(base, rows, index):
        # FSDP swapping views: flat shards, or gathered views whose storage
        # it already freed (FSDP's own hasattr checks read the property)
        return base
    return base.index_copy(0, index, rows.to(base.dtype))


def _fits(base, rows, index: torch.Tensor) -> bool:
    """Whether ``rows`` can be the ``index`` rows of ``base``, both holding
    data (not FSDP's flat shards or freed views)."""
    return (base is not None and rows is not None
            and base.dim() == rows.dim()
            and base.shape[1:] == rows.shape[1:]
            and rows.shape[0] == index.numel()
            and base.untyped_storage().nbytes() > 0
            and rows.untyped_storage().nbytes() > 0)


def _routed(module: nn.Module, name: str, rows_name: str):
    if managed_by_fsdp(module, name):
        return _merged(module, name, rows_name)
    consistent_(module)
    base, rows = own_tensor(module, name), own_tensor(module, rows_name)
    if base is None or rows is None or not rows.requires_grad \
            or not torch.is_grad_enabled():
        return base
    return RouteRows.apply(base, rows, module._buffers[INDEX_BUFFER])


def _weight_property(self):
    return _routed(self, 'weight', 'apla_weight')


def _bias_property(self):
    return _routed(self, 'bias', 'apla_bias')


_PROPERTIES = {
    'weight': parameter_property('weight', _weight_property),
    'bias': parameter_property('bias', _bias_property),
}
#: Projections read by their owner (``nn.MultiheadAttention.out_proj``) or
#: with a forward of their own: the routing properties only.
APLA_ROUTED = register_swap('apla', 'APLA', _PROPERTIES, group='adapter')
#: Plain ``nn.Linear`` projections: the same, plus the row-only backward.
APLA_LINEAR = register_swap('apla.linear', 'APLA',
                            dict(_PROPERTIES, forward=_linear_forward),
                            group='adapter')


def _merge_rows_for_state_dict(module, state_dict, prefix, local_metadata):
    # ``weight``/``bias`` hold the merged values once the sides are in step;
    # the entries are the same tensors, so the copy reaches them. The rows
    # themselves are dropped by the model-level hook
    # (:func:`drop_rows_from_state_dict`): FSDP checks that every parameter
    # of a unit is in the state dict after the unit's own hooks ran.
    consistent_(module)


def drop_rows_from_state_dict(layer_names, module, state_dict, prefix,
                              local_metadata) -> None:
    """State-dict post-hook of the adapted model (``functools.partial``
    with ``layer_names``): the rows leave the checkpoint, whose W_O holds
    them merged."""
    for name in layer_names:
        for rows in ROW_PARAMS:
            state_dict.pop(f'{prefix}{name}.{rows}', None)


def fill_rows(state_dict: dict, prefix: str, index: torch.Tensor,
              has_bias: bool, weight_shape=None) -> None:
    """Add the rows a state dict lacks, derived from its merged W_O (in
    place): ``<prefix>apla_weight``/``apla_bias`` are the selected rows of
    ``<prefix>weight``/``bias``. With ``weight_shape``, a weight of another
    shape is left alone (``load_state_dict`` reports the mismatch, and
    apla_mm's load guard with it)."""
    for name, rows in zip(('weight', 'bias'), ROW_PARAMS):
        key = prefix + name
        if (name == 'bias' and not has_bias) or key not in state_dict \
                or prefix + rows in state_dict:
            continue
        value = state_dict[key]
        if weight_shape is not None and tuple(value.shape) != tuple(
                weight_shape[:value.dim()]):
            continue
        state_dict[prefix + rows] = value.index_select(
            0, index.to(value.device))


def _rows_from_state_dict(module, state_dict, prefix, *args):
    # A plain checkpoint (or our own) provides the merged ``weight``; the
    # trainable rows are its selected rows.
    fill_rows(state_dict, prefix, module._buffers[INDEX_BUFFER],
              module._parameters.get('apla_bias') is not None,
              module._parameters['weight'].shape)


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
    _record(m)
    hooks[layer.name + ':save'] = \
        register_state_dict_post_hook(m, _merge_rows_for_state_dict)
    hooks[layer.name + ':load'] = \
        register_load_state_dict_pre_hook(m, _rows_from_state_dict)


def eject(layer: APLALayer) -> None:
    """Undo :func:`inject` (hooks are removed by the adapter)."""
    if layer.full:
        return
    m = layer.module
    restore_class(m, APLA_LINEAR)
    restore_class(m, APLA_ROUTED)
    for name in ROW_PARAMS:
        m._parameters.pop(name, None)
    m._buffers.pop(INDEX_BUFFER, None)
    m.__dict__.pop(_SYNCED, None)


#: Instance attribute: the version counters of the merged weights and of the
#: rows right after their last copy (:func:`consistent_`).
_SYNCED = '_apla_synced_versions'


def _versions(module: nn.Module, names) -> tuple:
    return tuple(p._version for p in (module._parameters.get(n)
                                      for n in names) if p is not None)


def _record(module: nn.Module) -> None:
    # Stamped with the tensors' identity (:func:`_identity`); without a
    # valid record the rows, the trained values, are copied over.
    module.__dict__[_SYNCED] = (_identity(module),
                                _versions(module, ('weight', 'bias')),
                                _versions(module, ROW_PARAMS))


def _identity(module: nn.Module) -> tuple:
    # Which tensors the record is about: a copied module has new ones, and
    # FSDP gives the same parameters new storage (``.data``) on every
    # gather; either way the record means nothing then.
    weight, rows = module._parameters['weight'], \
        module._parameters['apla_weight']
    return (id(weight), weight.data_ptr(), rows.data_ptr())


@torch.no_grad()
def _copy(module: nn.Module, into_weights: bool) -> None:
    index = module._buffers[INDEX_BUFFER]
    for name, rows in zip(('weight', 'bias'), ROW_PARAMS):
        if module._parameters.get(rows) is None:
            continue
        merged, trainable = module._parameters[name], module._parameters[rows]
        if into_weights:
            merged.index_copy_(0, index, trainable.to(merged.dtype))
        else:
            trainable.copy_(merged.index_select(0, index))
    _record(module)


def consistent_(module: nn.Module) -> None:
    """Bring the merged weights and the rows of an adapted module in step
    after whichever side changed since the last copy (see the module
    docstring).

    * the rows' version counters moved (an optimizer step): rows -> weights;
    * only the weights' counters moved (initialised or loaded in place):
      weights -> rows;
    * neither moved but the values differ: rows -> weights. Fused optimizers
      (``AdamW(fused=True)``) update parameters without moving their version
      counters (checked on torch 2.13), so values are compared too; a warning
      says once that ``adapter.attach_optimizer(optimizer)`` makes the copy
      happen right after each step instead.
    """
    if not _complete(module):
        # no rows; or FSDP holds the parameters: sharded (flat views), or
        # gathered views that are merged out of place (:func:`_merged`)
        return
    synced = module.__dict__.get(_SYNCED)
    if synced is not None and synced[0] != _identity(module):
        synced = None
    merged, rows = _versions(module, ('weight', 'bias')), \
        _versions(module, ROW_PARAMS)
    if synced is None or rows != synced[2]:
        _copy(module, into_weights=True)
    elif merged != synced[1]:
        _copy(module, into_weights=False)
    elif holds_values(module._parameters['apla_weight']) \
            and not _equal(module):
        _warn_unversioned()
        _copy(module, into_weights=True)


@torch.no_grad()
def _equal(module: nn.Module) -> bool:
    index = module._buffers[INDEX_BUFFER]
    for name, rows in zip(('weight', 'bias'), ROW_PARAMS):
        trainable = module._parameters.get(rows)
        if trainable is None:
            continue
        merged = module._parameters[name]
        if not torch.equal(merged.index_select(0, index),
                           trainable.to(merged.dtype)):
            return False
    return True


_WARNED = []


def _warn_unversioned() -> None:
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(
            'APLA: the trained rows changed without their version counters '
            'moving (a fused optimizer?); the rows were copied into W_O '
            'before this forward pass. Call adapter.attach_optimizer('
            'optimizer) to copy them right after each step (the APLA/PEFT '
            'hooks do).', stacklevel=3)


def _complete(module: nn.Module) -> bool:
    """Whether the module holds its whole weight and rows as parameters
    (not FSDP's flat shards or views)."""
    weight, rows = own_tensor(module, 'weight'), own_tensor(module,
                                                           'apla_weight')
    return (weight is not None and weight.dim() == 2
            and not managed_by_fsdp(module, 'weight')
            and _fits(weight, rows, module._buffers[INDEX_BUFFER]))


def _copy_rows_(layer: APLALayer, into_weights: bool) -> None:
    if layer.full or not _complete(layer.module):
        # rank='full'; or FSDP holds a flat shard outside forward (the rows
        # are merged out of place in forward and in the state dict)
        return
    _copy(layer.module, into_weights)


def rows_to_weights_(layer: APLALayer) -> None:
    """Copy the trainable rows into the frozen merged weights."""
    _copy_rows_(layer, into_weights=True)


def weights_to_rows_(layer: APLALayer) -> None:
    """Copy the selected rows of the weights into the trainable rows."""
    _copy_rows_(layer, into_weights=False)
