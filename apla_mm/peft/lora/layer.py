"""The mechanics of one LoRA layer: factors beside a frozen weight.

Two ways in, chosen per target, as the architecture requires:

* a linear layer called as a module (timm ``attn.qkv``/``attn.proj``,
  mmpretrain) gets a forward ``F.linear(x, W, b) + s * (drop(x) A^T) B^T``,
  which keeps only ``x`` and ``x A^T`` for backward; readers of its
  ``.weight`` (e.g. the ``nn.MultiheadAttention`` owning ``out_proj``) get
  the merged ``W + s * B @ A``;
* a weight that its owner reads directly (mmseg's ``nn.MultiheadAttention``:
  ``in_proj_weight``) is replaced by a property returning ``W + s * B @ A``.
  Input dropout cannot apply there.

The frozen ``W`` is authoritative for the base and never written while
training; the update lives in ``lora_A``/``lora_B`` only, so a checkpoint
holds both and :func:`merge_` folds them in for inference.
"""
import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..base import AdaptedLayer
from ..utils import layer_seed
from ..swap import (own_tensor, parameter_property, register_swap,
                    restore_class, swap_class)
from ..targets import MHA_WEIGHT

FACTORS = ('lora_A', 'lora_B')


def delta_weight(a: torch.Tensor, b: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """LoRA's update of the weight, ``scale * B @ A``."""
    return (b @ a) * scale


def _module_delta(module: nn.Module) -> torch.Tensor:
    return delta_weight(own_tensor(module, 'lora_A'),
                        own_tensor(module, 'lora_B'), module.lora_scale)


def _merged_property(param: str):

    def getter(self):
        base = own_tensor(self, param)
        a, b = own_tensor(self, 'lora_A'), own_tensor(self, 'lora_B')
        if not all(t is not None and t.dim() == 2
                   and t.untyped_storage().nbytes() > 0 for t in (base, a, b))\
                or base.shape != (b.shape[0], a.shape[1]):
            # FSDP swapping views: flat shards, or gathered views whose
            # storage it already freed (FSDP's own hasattr checks read this)
            return base
        return base + _module_delta(self).to(base.dtype)

    return parameter_property(param, getter)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    base = F.linear(x, own_tensor(self, 'weight'), own_tensor(self, 'bias'))
    a = own_tensor(self, 'lora_A')
    b = own_tensor(self, 'lora_B')
    update = F.linear(F.linear(self.lora_dropout(x), a), b)
    return base + update * self.lora_scale


#: ``nn.MultiheadAttention``: its ``in_proj_weight`` is read merged.
LORA_MHA = register_swap('lora.mha', 'LoRA',
                         {MHA_WEIGHT: _merged_property(MHA_WEIGHT)},
                         group='adapter')
#: Linear layers: the factored forward, and ``.weight`` read merged.
LORA_LINEAR = register_swap('lora.linear', 'LoRA', {
    'forward': _linear_forward,
    'weight': _merged_property('weight')
}, group='adapter')


@dataclass
class LoRALayer(AdaptedLayer):
    """One adapted weight: ``module.<param>`` (``out x in``)."""

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [self.module._parameters[n] for n in FACTORS]


def initial_a(rank: int, in_features: int, seed: int,
              name: str) -> torch.Tensor:
    """LoRA's ``A``: ``nn.Linear``'s default initialisation
    (``kaiming_uniform_(a=sqrt(5))``, i.e. uniform in
    ``+-1/sqrt(in_features)``, as in HF peft), drawn from a generator seeded
    by ``(seed, layer name)``: the same on every process, whether LoRA is
    applied by a hook or at build time."""
    generator = torch.Generator().manual_seed(
        layer_seed(seed, name, namespace='lora'))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) \
        * bound


def inject(layer: LoRALayer, rank: int, scale: float, dropout: float,
           seed: int = 0) -> None:
    """Create ``A`` (seeded Kaiming-uniform, :func:`initial_a`) and ``B``
    (zeros) and swap the layer's class."""
    m = layer.module
    weight = m._parameters[layer.param]
    a = initial_a(rank, layer.in_features, seed, layer.name).to(
        device=weight.device, dtype=weight.dtype)
    m.register_parameter('lora_A', nn.Parameter(a))
    m.register_parameter(
        'lora_B',
        nn.Parameter(
            torch.zeros(layer.out_features, rank, device=weight.device,
                        dtype=weight.dtype)))
    m.lora_scale = scale
    m.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    swap_class(m, LORA_MHA if layer.param == MHA_WEIGHT else LORA_LINEAR)


@torch.no_grad()
def merge_(layer: LoRALayer) -> None:
    """Add ``s * B @ A`` to the frozen weight."""
    weight = layer.module._parameters[layer.param]
    weight.add_(_module_delta(layer.module).to(weight.dtype))


def eject(layer: LoRALayer) -> None:
    """Undo :func:`inject` (without merging)."""
    m = layer.module
    restore_class(m, LORA_MHA if layer.param == MHA_WEIGHT else LORA_LINEAR)
    for name in FACTORS:
        m._parameters.pop(name, None)
    m._modules.pop('lora_dropout', None)
    m.__dict__.pop('lora_scale', None)
