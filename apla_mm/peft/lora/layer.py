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
from ..swap import register_swap, restore_class, swap_class
from ..targets import MHA_WEIGHT

FACTORS = ('lora_A', 'lora_B')


def delta_weight(a: torch.Tensor, b: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """LoRA's update of the weight, ``scale * B @ A``."""
    return (b @ a) * scale


def _module_delta(module: nn.Module) -> torch.Tensor:
    return delta_weight(module._parameters['lora_A'],
                        module._parameters['lora_B'], module.lora_scale)


def _merged_property(param: str):

    def getter(self):
        base = self._parameters[param]
        return base + _module_delta(self).to(base.dtype)

    return property(getter)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    base = F.linear(x, self._parameters['weight'], self._parameters['bias'])
    a = self._parameters['lora_A']
    b = self._parameters['lora_B']
    update = F.linear(F.linear(self.lora_dropout(x), a), b)
    return base + update * self.lora_scale


#: ``nn.MultiheadAttention``: its ``in_proj_weight`` is read merged.
LORA_MHA = register_swap('lora.mha', 'LoRA',
                         {MHA_WEIGHT: _merged_property(MHA_WEIGHT)})
#: Linear layers: the factored forward, and ``.weight`` read merged.
LORA_LINEAR = register_swap('lora.linear', 'LoRA', {
    'forward': _linear_forward,
    'weight': _merged_property('weight')
})


@dataclass
class LoRALayer(AdaptedLayer):
    """One adapted weight: ``module.<param>`` (``out x in``)."""

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [self.module._parameters[n] for n in FACTORS]


def inject(layer: LoRALayer, rank: int, scale: float,
           dropout: float) -> None:
    """Create ``A`` (Kaiming-uniform) and ``B`` (zeros) and swap the
    layer's class."""
    m = layer.module
    weight = m._parameters[layer.param]
    a = torch.empty(rank, layer.in_features, device=weight.device,
                    dtype=weight.dtype)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
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
    restore_class(m)
    for name in FACTORS:
        m._parameters.pop(name, None)
    m._modules.pop('lora_dropout', None)
    m.__dict__.pop('lora_scale', None)
