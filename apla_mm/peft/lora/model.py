"""LoRA on the attention projections of a ViT backbone (the baseline).

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv 2106.09685: a frozen weight ``W`` (``out x in``) is adapted as
``W + (alpha / r) * B @ A`` with trainable ``A`` (``r x in``, Kaiming-uniform)
and ``B`` (``out x r``, zeros, so training starts from the pretrained model).

The adapter fills in :class:`~apla_mm.peft.base.BaseAdapter`; one layer's
mechanics are in :mod:`.layer`. Trainable tensors are ``lora_A``/``lora_B``
registered on the adapted module, so checkpoints hold the frozen weights plus
the factors; the hook merges them for testing (:meth:`merge_and_unload`) and
``tools/export_delta.py`` exports the factors plus the heads.
"""
from typing import List

import torch

from ..base import BaseAdapter, StateDict
from ..targets import Target
from .config import LoRAConfig, lora_scale
from .layer import (FACTORS, LoRALayer, delta_weight, eject, initial_a,
                    inject, merge_)


class LoRAAdapter(BaseAdapter):
    """LoRA applied to a model (freezing, factors, merging).

    Args:
        model (nn.Module): The full model; names are relative to it.
        config (LoRAConfig): Settings.
    """

    method = 'lora'
    config_class = LoRAConfig
    default_targets = ('qkv', 'proj')
    frozen_note = 'frozen except LoRA factors'
    #: Checkpoints hold the factors beside the frozen weights; inference
    #: outside training merges them first (the plain model runs).
    merges_for_inference = True
    layers: List[LoRALayer]

    def describe(self) -> str:
        return (f'LoRA: {len(self.layers)} weights (e.g. '
                f'{self.layers[0].name}), rank {self.config.rank}, alpha '
                f'{self.config.alpha}; {self.num_trainable():,} trainable '
                'entries in the factors.')

    def complete_state_dict(self, state_dict: StateDict) -> StateDict:
        """Factors missing in a plain checkpoint are LoRA's initial ones
        (seeded ``A``, zero ``B``: the update starts at zero)."""
        out = dict(state_dict)
        for layer in self.layers:
            a_key, b_key = f'{layer.name}.lora_A', f'{layer.name}.lora_B'
            if a_key not in out:
                out[a_key] = initial_a(self.config.rank, layer.in_features,
                                       self.config.seed, layer.name)
            if b_key not in out:
                out[b_key] = torch.zeros(layer.out_features, self.config.rank)
        return out

    def on_weights_loaded(self) -> None:
        """Nothing: the factors are the method's own and not derived from
        the weights."""

    def _make_layer(self, target: Target) -> LoRALayer:
        out_features, in_features = target.shape
        return LoRALayer(target.name, target.module, target.param,
                         out_features, in_features)

    def _inject(self, layer: LoRALayer) -> None:
        inject(layer, self.config.rank, self.config.scale,
               self.config.dropout, self.config.seed)

    def _eject(self, layer: LoRALayer) -> None:
        eject(layer)

    def _merge_(self) -> None:
        for layer in self.layers:
            merge_(layer)

    # -- delta files -----------------------------------------------------
    @classmethod
    def new_entries(cls, meta: dict) -> List[str]:
        """The factors ``<layer>.lora_A``/``.lora_B``."""
        return [f'{name}.{factor}' for name in meta['layers']
                for factor in FACTORS]

    @classmethod
    def base_entries(cls, meta: dict) -> List[str]:
        """The adapted weights, to which merging adds the update."""
        return [f'{name}.{info["param"]}'
                for name, info in meta['layers'].items()]

    @classmethod
    def merge_delta_(cls, merged: StateDict, delta_state: StateDict,
                     meta: dict) -> None:
        """Add ``alpha / r * B @ A`` (in float32) to each adapted weight."""
        config = meta['config']
        scale = lora_scale(config['alpha'], config['rank'])
        for name, info in meta['layers'].items():
            key = f'{name}.{info["param"]}'
            update = delta_weight(delta_state[f'{name}.lora_A'].float(),
                                  delta_state[f'{name}.lora_B'].float(),
                                  scale)
            merged[key] = merged[key] + update.to(merged[key].dtype)
