"""Frozen weights stored in the autocast dtype, with fp32 masters.

Under AMP, autocast runs linear layers, convolutions and attention
projections in bf16/fp16: it casts each fp32 weight on every use and keeps
the cast copy for backward (for a frozen backbone: a second, half-size copy
of every frozen weight, plus the fp32 original). :class:`FrozenLowPrecision`
stores those frozen weights in the autocast dtype instead. Autocast's cast
of a tensor that already has the target dtype is the tensor itself, so the
forward pass computes with exactly the values stock AMP computes with
(``fp32 -> bf16`` rounding is the same, once instead of every step): losses
and the gradients of the trained parameters equal stock AMP's
(``tests/test_memory_low_precision.py``).

What is cast: parameters with ``requires_grad=False`` that an
``nn.Linear``, ``nn.Conv1d/2d/3d`` or ``nn.MultiheadAttention`` (its
``in_proj_*``) owns -- the tensors autocast casts anyway. Norm weights,
position embeddings, class tokens, buffers and every trainable tensor
(APLA's rows ``apla_weight``/``apla_bias``, LoRA factors, necks, heads)
stay float32. APLA's W_O is frozen and holds the merged weights: it is
cast too; its trained rows keep fp32 masters in ``apla_weight`` and
:meth:`~apla_mm.peft.apla.APLAAdapter.sync_` writes them into the cast
weight after each step (rounded to its dtype).

What this changes, exactly:

* **Checkpoints and deltas keep the base's fp32 weights.** fp32 masters of
  every cast tensor are kept (on the CPU by default). ``state_dict()``
  returns the master in place of the low-precision tensor; for APLA's W_O
  the master with the fp32 trained rows copied in. So checkpoints, deltas
  (``tools/export_delta.py``) and merged models hold bit for bit the
  pretrained fp32 frozen weights and the fp32 trained rows, as without
  this option. ``load_state_dict`` updates the masters, and the
  low-precision copies from them.
* **Outputs of the merged fp32 model** (a plain model loaded from such a
  checkpoint, run without autocast) differ from the trained model's
  outputs under AMP by the precision of AMP itself (the same difference as
  between stock AMP training and fp32 inference of its checkpoint): the
  merged model computes in fp32 with the fp32 weights.
* **Only under autocast.** Outside autocast an fp32 input meets a bf16
  weight and torch raises a dtype error, so the weights must be restored
  (:meth:`FrozenLowPrecision.restore_`) for fp32 evaluation; the
  :class:`~apla_mm.engine.hooks.MemoryEfficientHook` does so around
  validation.
"""
import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from apla_mm.compat import (register_load_state_dict_pre_hook,
                             register_state_dict_post_hook)

__all__ = ['FrozenLowPrecision', 'castable_frozen_parameters']

_CAST_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.MultiheadAttention)
_MHA_PARAMS = ('in_proj_weight', 'in_proj_bias', 'q_proj_weight',
               'k_proj_weight', 'v_proj_weight', 'bias_k', 'bias_v')


def castable_frozen_parameters(
        model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(full name, owner, local name)`` of the frozen floating-point
    parameters of linear/conv/attention layers (each once)."""
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        if not isinstance(module, _CAST_MODULES):
            continue
        names = (_MHA_PARAMS if isinstance(module, nn.MultiheadAttention)
                 else ('weight', 'bias'))
        for local in names:
            p = module._parameters.get(local)
            if p is None or p.requires_grad or not p.is_floating_point() \
                    or id(p) in seen:
                continue
            seen.add(id(p))
            out.append((f'{mod_name}.{local}' if mod_name else local,
                        module, local))
    return out


class FrozenLowPrecision:
    """Store a model's frozen linear/conv weights in ``dtype``.

    Call after the weights are initialised or loaded (and, for APLA, after
    the rows were refreshed from them), before training::

        lp = FrozenLowPrecision(model, torch.bfloat16)   # casts
        ...train under autocast(dtype=torch.bfloat16)...
        model.state_dict()    # fp32 frozen weights (masters)
        lp.restore_()         # fp32 weights back in the model

    Args:
        model (nn.Module): Model (unwrapped).
        dtype (torch.dtype): ``torch.bfloat16`` or ``torch.float16``.
        master_device (str | torch.device, optional): Where the fp32
            masters live. Defaults to ``'cpu'`` (off the accelerator);
            ``None`` keeps them on the parameters' device.
    """

    def __init__(self,
                 model: nn.Module,
                 dtype: torch.dtype,
                 master_device: Optional[str] = 'cpu') -> None:
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f'frozen weights can be stored in bfloat16 or float16 (the '
                f'autocast dtypes), got {dtype}.')
        self.model = model
        self.dtype = dtype
        self.master_device = master_device
        self.entries = castable_frozen_parameters(model)
        #: (module, parameter name) -> fp32 master. Keyed by the module
        #: object, so that a pickled or deep-copied model (torch.save,
        #: EMA) keeps its masters with its own modules.
        self.masters: Dict[Tuple[nn.Module, str], torch.Tensor] = {}
        self._hooks = []
        self.active = False
        self.cast_()
        for module in {id(m): m for _, m, _ in self.entries}.values():
            # partials, not bound methods: torch tags public-API hooks with
            # an attribute; and unlike lambdas they pickle with the model
            self._hooks.append(register_state_dict_post_hook(
                module, functools.partial(_state_dict_hook, self)))
            self._hooks.append(register_load_state_dict_pre_hook(
                module, functools.partial(_load_hook, self)))

    # ------------------------------------------------------------------
    def num_bytes_saved(self) -> int:
        """Bytes the cast saves on the parameters' device."""
        return sum(m._parameters[n].numel() *
                   (4 - torch.empty((), dtype=self.dtype).element_size())
                   for _, m, n in self.entries)

    @torch.no_grad()
    def cast_(self) -> None:
        """(Re)take fp32 masters of the frozen weights and cast them."""
        if self.active:
            return
        for _, module, local in self.entries:
            p = module._parameters[local]
            if p.requires_grad:
                raise RuntimeError(
                    f'{local} of {type(module).__name__} became trainable '
                    'after its frozen weight was cast; cast after the '
                    'trainable parameters are final.')
            master = p.detach().to(self.master_device or p.device,
                                   dtype=torch.float32, copy=True)
            self.masters[(module, local)] = master
            p.data = p.data.to(self.dtype)
        self.active = True

    @torch.no_grad()
    def restore_(self) -> None:
        """Put fp32 weights back (the masters, with APLA's trained rows)."""
        if not self.active:
            return
        for _, module, local in self.entries:
            p = module._parameters[local]
            p.data = self._full(module, local,
                                self.masters[(module, local)]).to(p.device)
        self.masters.clear()
        self.active = False

    def remove(self) -> None:
        """Restore fp32 weights and remove the state-dict hooks."""
        self.restore_()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------
    @staticmethod
    def _full(module: nn.Module, local: str,
              master: torch.Tensor) -> torch.Tensor:
        """The fp32 value of a frozen weight: the master, with APLA's
        trained rows (fp32) copied in for W_O."""
        rows = {'weight': 'apla_weight', 'bias': 'apla_bias'}.get(local)
        index = module._buffers.get('apla_index')
        trained = module._parameters.get(rows) if rows else None
        if index is None or trained is None:
            return master
        out = master.clone()
        out.index_copy_(0, index.to(out.device),
                        trained.detach().to(out.device, torch.float32))
        return out

    def _state_dict_hook(self, module, state_dict, prefix, local_metadata):
        if not self.active:
            return
        for name, p in module._parameters.items():
            master = self.masters.get((module, name))
            if p is not None and master is not None \
                    and prefix + name in state_dict:
                state_dict[prefix + name] = self._full(module, name, master)

    def _load_hook(self, module, state_dict, prefix, *args):
        if not self.active:
            return
        with torch.no_grad():
            for name, p in module._parameters.items():
                key = prefix + name
                master = self.masters.get((module, name))
                if p is not None and master is not None \
                        and key in state_dict \
                        and state_dict[key].shape == p.shape:
                    master.copy_(state_dict[key])


def _state_dict_hook(owner: FrozenLowPrecision, *args) -> None:
    owner._state_dict_hook(*args)


def _load_hook(owner: FrozenLowPrecision, *args) -> None:
    owner._load_hook(*args)
