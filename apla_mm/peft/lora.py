"""LoRA on the attention projections of a ViT backbone (the baseline).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685: a frozen weight ``W`` (``out x in``) is adapted as
``W + (alpha / r) * B @ A`` with trainable ``A`` (``r x in``, Kaiming-uniform)
and ``B`` (``out x r``, zeros, so training starts from the pretrained model).

Two ways in, chosen per target, as the architecture requires:

* a linear layer called as a module (timm ``attn.qkv``/``attn.proj``,
  mmpretrain) gets a forward ``F.linear(x, W, b) + s * (drop(x) A^T) B^T``,
  which keeps only ``x`` and ``x A^T`` for backward;
* a weight that its owner reads directly (mmseg's ``nn.MultiheadAttention``:
  ``in_proj_weight`` and ``out_proj.weight``, whose forward never calls
  ``out_proj``) is replaced by a property returning ``W + s * B @ A``. Input
  dropout cannot apply there.

Trainable tensors are ``lora_A``/``lora_B`` registered on the adapted
module, so checkpoints hold the frozen weights plus the factors; the hook
merges them for testing (:meth:`LoRAAdapter.merge_and_unload`) and
``tools/export_delta.py`` exports the factors plus the heads.
"""
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .targets import (ATTN_OUT_PATTERNS, ATTN_QKV_PATTERNS, as_pattern_list,
                      find_modules)
from .utils import remove_hooks, restore_class, swap_class

#: Shortcut target names for :class:`LoRAConfig`.
TARGET_SHORTCUTS = {
    'qkv': ATTN_QKV_PATTERNS,
    'proj': ATTN_OUT_PATTERNS,
}
#: Where nn.MultiheadAttention keeps its input projection.
_MHA_WEIGHT = 'in_proj_weight'


@dataclass
class LoRAConfig:
    """LoRA settings.

    Args:
        rank (int): Rank ``r`` of the update. Defaults to 8.
        alpha (float): Scale numerator, the update is ``alpha / r * B @ A``.
            Defaults to 16.
        targets (str | list[str]): ``'qkv'`` and/or ``'proj'`` (the
            attention input and output projections of timm, mmseg and
            mmpretrain ViTs), or full-match regexes over module names.
            Defaults to ``('qkv', 'proj')``.
        dropout (float): Dropout on the LoRA branch's input (module-called
            layers only). Defaults to 0.
        frozen_modules (list[str]): Top-level modules frozen apart from the
            factors. Defaults to ``('backbone',)``.
    """
    rank: int = 8
    alpha: float = 16.0
    targets: Union[str, Sequence[str]] = ('qkv', 'proj')
    dropout: float = 0.0
    frozen_modules: Tuple[str, ...] = field(default=('backbone', ))

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) \
                or self.rank <= 0:
            raise ValueError(f'LoRA rank must be a positive integer, got '
                             f'{self.rank!r}')
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f'LoRA alpha must be > 0, got {self.alpha!r}')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
        if isinstance(self.targets, str):
            self.targets = (self.targets, )
        self.targets = tuple(self.targets)
        if isinstance(self.frozen_modules, str):
            self.frozen_modules = (self.frozen_modules, )
        self.frozen_modules = tuple(self.frozen_modules)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def patterns(self) -> List[str]:
        out: List[str] = []
        for target in self.targets:
            if target in TARGET_SHORTCUTS:
                out.extend(as_pattern_list(None, TARGET_SHORTCUTS[target]))
            else:
                out.append(target)
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out['targets'] = list(self.targets)
        out['frozen_modules'] = list(self.frozen_modules)
        return out


def _delta(module: nn.Module) -> torch.Tensor:
    a = module._parameters['lora_A']
    b = module._parameters['lora_B']
    return (b @ a) * module.lora_scale


def _merged_property(param: str):

    def getter(self):
        base = self._parameters[param]
        return base + _delta(self).to(base.dtype)

    return property(getter)


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    base = F.linear(x, self._parameters['weight'], self._parameters['bias'])
    a = self._parameters['lora_A']
    b = self._parameters['lora_B']
    update = F.linear(F.linear(self.lora_dropout(x), a), b)
    return base + update * self.lora_scale


def _mha_namespace() -> Dict[str, object]:
    return {_MHA_WEIGHT: _merged_property(_MHA_WEIGHT)}


def _linear_namespace() -> Dict[str, object]:
    # module calls use the factored forward; readers of `.weight` (e.g. the
    # MultiheadAttention owning `out_proj`) get the merged weight
    return {'forward': _linear_forward, 'weight': _merged_property('weight')}


@dataclass
class LoRALayer:
    """One adapted weight: ``module.<param>`` (``out x in``)."""
    name: str
    module: nn.Module
    param: str
    out_features: int
    in_features: int

    @property
    def key(self) -> str:
        """State-dict key of the adapted weight."""
        return f'{self.name}.{self.param}'

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [self.module._parameters['lora_A'],
                self.module._parameters['lora_B']]


class LoRAAdapter:
    """LoRA applied to a model (freezing, factors, merging).

    Args:
        model (nn.Module): The full model; names are relative to it.
        config (LoRAConfig): Settings.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig) -> None:
        self.model = model
        self.config = config
        self._hooks: Dict[str, object] = {}
        for prefix in config.frozen_modules:
            try:
                model.get_submodule(prefix)
            except AttributeError as e:
                raise ValueError(
                    f'frozen module {prefix!r} does not exist in '
                    f'{type(model).__name__}') from e
        found = find_modules(
            model, config.patterns(), within=config.frozen_modules,
            weight_name=None)
        self.layers: List[LoRALayer] = []
        for name, module in found:
            if isinstance(module, nn.MultiheadAttention):
                param = _MHA_WEIGHT
            else:
                param = 'weight'
            weight = module._parameters.get(param)
            if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
                raise TypeError(
                    f'LoRA target {name!r} ({type(module).__name__}) has no '
                    f'2-D parameter {param!r}; targets must be linear layers '
                    'or nn.MultiheadAttention modules.')
            self.layers.append(
                LoRALayer(name, module, param, weight.shape[0],
                          weight.shape[1]))
        for prefix in config.frozen_modules:
            model.get_submodule(prefix).requires_grad_(False)
        for layer in self.layers:
            self._inject(layer)

    def _inject(self, layer: LoRALayer) -> None:
        m = layer.module
        weight = m._parameters[layer.param]
        r = self.config.rank
        a = torch.empty(r, layer.in_features, device=weight.device,
                        dtype=weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        m.register_parameter('lora_A', nn.Parameter(a))
        m.register_parameter(
            'lora_B',
            nn.Parameter(
                torch.zeros(layer.out_features, r, device=weight.device,
                            dtype=weight.dtype)))
        m.lora_scale = self.config.scale
        m.lora_dropout = (nn.Dropout(self.config.dropout)
                          if self.config.dropout else nn.Identity())
        if layer.param == _MHA_WEIGHT:
            swap_class(m, 'LoRA', _mha_namespace())
        else:
            swap_class(m, 'LoRA', _linear_namespace())

    # ------------------------------------------------------------------
    def replacements(self) -> Dict[int, List[nn.Parameter]]:
        """``id(adapted weight) -> [lora_A, lora_B]`` for the optimizer:
        the factors take the weight's place and settings."""
        return {
            id(layer.module._parameters[layer.param]):
            layer.trainable_parameters()
            for layer in self.layers
        }

    def adapted_parameters(self) -> List[nn.Parameter]:
        return [p for layer in self.layers
                for p in layer.trainable_parameters()]

    def shadow_parameters(self) -> List[nn.Parameter]:
        return []  # LoRA factors are new parameters

    def num_trainable(self) -> int:
        """``sum r * (in + out)`` over the adapted weights."""
        return sum(p.numel() for p in self.adapted_parameters())

    def sync_(self) -> None:
        """Nothing to do: the factors are used directly."""

    def meta(self) -> dict:
        return dict(
            method='lora',
            format=1,
            config=self.config.to_dict(),
            frozen_modules=list(self.config.frozen_modules),
            layers={
                layer.name: dict(
                    param=layer.param,
                    out_features=layer.out_features,
                    in_features=layer.in_features)
                for layer in self.layers
            })

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Fold ``s * B @ A`` into the weights and remove LoRA, leaving the
        plain model (module classes and state-dict keys of the base)."""
        for layer in self.layers:
            m = layer.module
            weight = m._parameters[layer.param]
            weight.add_(_delta(m).to(weight.dtype))
        return self.unload(merged=True)

    def unload(self, merged: bool = False) -> nn.Module:
        """Remove LoRA without merging (the base model) unless ``merged``."""
        remove_hooks(self._hooks)
        for layer in self.layers:
            m = layer.module
            restore_class(m)
            for name in ('lora_A', 'lora_B'):
                m._parameters.pop(name, None)
            m._modules.pop('lora_dropout', None)
            m.__dict__.pop('lora_scale', None)
        self.layers = []
        return self.model
