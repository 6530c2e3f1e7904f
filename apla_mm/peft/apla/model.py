"""APLA: train r output channels of every attention output projection W_O.

Sorkhei et al., "APLA: A Simple Adaptation Method for Vision Transformers",
arXiv 2503.11335. For every targeted W_O (an ``out x in`` weight and its
bias) a fixed random subset of ``r`` output channels (rows of the weight,
with their bias entries) is chosen once per layer; only these train, the rest
of the backbone is frozen. Nothing is added to the architecture.

The adapter (:class:`APLAAdapter`) fills in the contract of
:class:`~apla_mm.peft.base.BaseAdapter`; the per-layer mechanics (trainable
rows beside the frozen merged W_O, the autograd functions, the state-dict
hooks, which side is authoritative when) are in :mod:`.layer`, the channel
choice in :mod:`.selection`. Consequences:

* frozen entries, the unselected rows of W_O included, are never written, so
  they stay bit-identical under any optimizer (weight decay, momentum), AMP,
  clipping or gradient accumulation;
* gradients and optimizer state exist for the ``r`` rows only;
* no extra weight copy is made or kept for backward, and with grad disabled
  (inference) the model runs as the plain model;
* ``state_dict()`` has exactly the keys of the unmodified model and holds the
  merged weights, so checkpoints are plain model checkpoints.
"""
import functools
import json
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from apla_mm.compat import register_state_dict_post_hook
from ..base import BaseAdapter, StateDict
from ..targets import Target
from .config import APLAConfig, layer_rank
from .layer import (APLALayer, drop_rows_from_state_dict, eject, fill_rows,
                    inject, rows_to_weights_, weights_to_rows_)
from .selection import (check_indices, load_index_file, norm_channels,
                        random_channels)


class APLAAdapter(BaseAdapter):
    """APLA applied to a model: selection, freezing, syncing, unloading.

    Build it once the model exists (the :class:`~apla_mm.engine.APLAHook`
    does so before training starts)::

        adapter = APLAAdapter(model, APLAConfig(rank=64, seed=0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)   # rows + neck/heads
        adapter.attach_optimizer(optimizer)        # sync_() after each step
        loss.backward(); optimizer.step()   # (W_O follows the rows anyway)
        torch.save(model.state_dict(), 'model.pth')  # plain keys, merged

    (``trainable`` holds the rows ``apla_weight``/``apla_bias``, not the
    frozen W_O; :class:`~apla_mm.engine.APLAHook` instead moves an optimizer
    that was built on the unmodified model onto the rows, see
    :meth:`replacements`.) After loading other weights into the model, call
    :meth:`refresh_` so that the rows are theirs.

    ``torch.save(model)`` and :func:`copy.deepcopy` work on the adapted
    model (:mod:`apla_mm.peft.swap`), but the copy has no adapter driving
    it; save ``model.state_dict()`` (a plain checkpoint) for anything that
    should outlive the run.

    Args:
        model (nn.Module): The full model (segmentor/detector); names of
            targets and of ``config.frozen_modules`` are relative to it.
        config (APLAConfig): Method settings.
    """

    method = 'apla'
    config_class = APLAConfig
    default_targets = ('proj', )
    frozen_note = 'frozen except W_O rows'
    layers: List[APLALayer]

    def __init__(self, model: nn.Module, config: APLAConfig) -> None:
        self._selected = False
        super().__init__(model, config)
        indices = None
        if config.index_file is not None:
            indices = load_index_file(config.index_file, self.layers,
                                      config.rank)
        elif not config.full and config.selection == 'random':
            indices = {
                layer.name: random_channels(layer.out_features,
                                            layer.target_rank, config.seed,
                                            layer.name)
                for layer in self.layers
            }
        if indices is not None:
            self.set_indices(indices)

    # -- the contract: layers --------------------------------------------
    def _make_layer(self, target: Target) -> APLALayer:
        if target.param != 'weight':
            raise TypeError(
                f'APLA target {target.name!r} is a '
                f'{type(target.module).__name__}; APLA adapts linear layers '
                '(the attention output projection), e.g. its out_proj.')
        out_features, in_features = target.shape
        bias = target.module._parameters.get('bias')
        return APLALayer(
            target.name, target.module, target.param, out_features,
            in_features, has_bias=bias is not None, full=self.config.full,
            target_rank=layer_rank(self.config.rank, out_features,
                                   target.name))

    def _inject(self, layer: APLALayer) -> None:
        inject(layer, self._hooks)
        if not layer.full and 'model:drop-rows' not in self._hooks:
            self._hooks['model:drop-rows'] = register_state_dict_post_hook(
                self.model, functools.partial(
                    drop_rows_from_state_dict, self._row_layers))

    @property
    def _row_layers(self) -> List[str]:
        return [layer.name for layer in self.layers if not layer.full]

    def _eject(self, layer: APLALayer) -> None:
        eject(layer)

    def layer_meta(self, layer: APLALayer) -> dict:
        return dict(
            rank=layer.target_rank,
            out_features=layer.out_features,
            in_features=layer.in_features,
            has_bias=layer.has_bias,
            index=(None if layer.full else layer.index.tolist()))

    # -- selection -------------------------------------------------------
    @property
    def needs_selection(self) -> bool:
        """Whether channels still have to be chosen from the weights
        (``selection='norm'``), which :meth:`select_from_weights_` does.
        Until then ``apla_index`` holds the placeholder ``0 ... r-1``."""
        return not self.config.full and not self._selected

    def select_from_weights_(self) -> None:
        """Choose the rows of largest norm of the current weights."""
        self.set_indices({
            layer.name: norm_channels(layer.module._parameters['weight'],
                                      layer.module._parameters.get('bias'),
                                      layer.target_rank)
            for layer in self.layers
        })

    def set_indices(self, indices: Dict[str, Sequence[int]]) -> None:
        """Use these channels per layer and reload the rows from the
        (merged) weights.

        Args:
            indices (dict): Layer name to its ``rank`` distinct channels.
        """
        if self.config.full:
            raise RuntimeError("rank='full' trains every channel; there are "
                               'no indices to set.')
        check_indices(indices, self.layers, 'indices')
        for layer in self.layers:
            buf = layer.index
            value = torch.as_tensor(
                list(indices[layer.name]), dtype=torch.long)
            buf.copy_(value.sort().values.to(buf.device))
        self._selected = True
        self.refresh_()

    def indices(self) -> Dict[str, List[int]]:
        """Selected channels per layer (all channels for ``'full'``)."""
        return {
            layer.name: (list(range(layer.out_features)) if layer.full else
                         layer.index.tolist())
            for layer in self.layers
        }

    def save_index_file(self, path: str) -> None:
        """Write the selection as JSON ``{layer name: [channels]}``."""
        with open(path, 'w') as f:
            json.dump(self.indices(), f, indent=1)

    def on_weights_loaded(self) -> None:
        """Once the run's weights are in place: choose the channels with
        ``selection='norm'`` (unless a resumed checkpoint set them), else
        reload the rows from the weights."""
        if self.needs_selection:
            self.select_from_weights_()
        else:
            self.refresh_()

    def describe(self) -> str:
        layer = self.layers[0]
        ranks = sorted({(lay.target_rank, lay.out_features)
                        for lay in self.layers})
        if self.config.full:
            rank = 'all'
        elif len(ranks) == 1:
            rank = f'{layer.target_rank} of {layer.out_features}'
        else:
            rank = ', '.join(f'{r} of {o}' for r, o in ranks) + (
                f' (rank={self.config.rank})')
        selection = ('index file' if self.config.index_file else
                     self.config.selection)
        return (f'APLA: {len(self.layers)} attention output projections '
                f'(e.g. {layer.name}), {rank} output channels each, '
                f'{selection} selection, seed {self.config.seed}; '
                f'{self.num_trainable():,} trainable entries in W_O.')

    # -- the contract: rows and weights ----------------------------------
    def sync_(self) -> None:
        """Copy the trainable rows into the frozen weights (after a step)."""
        for layer in self.layers:
            rows_to_weights_(layer)

    def refresh_(self) -> None:
        """Copy the selected rows of the weights into the trainable rows
        (after the weights were initialised or loaded)."""
        for layer in self.layers:
            weights_to_rows_(layer)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the merged weights in step with the rows ``optimizer``
        trains: :meth:`sync_` runs after each of its ``step()`` calls.

        This makes the invariant the adapter's own, whatever wraps the
        optimizer: with gradient accumulation the optimizer steps (and the
        weights change) only at the end of each accumulation window, and an
        AMP step that the loss scaler skips (inf/NaN gradients) does not call
        ``optimizer.step()``, so nothing changes. Calling it again with the
        same optimizer is a no-op; :meth:`unload` removes the hook.
        """
        key = f'optimizer:{id(optimizer)}'
        if key in self._hooks:
            return
        self._hooks[key] = optimizer.register_step_post_hook(
            lambda _optimizer, _args, _kwargs: self.sync_())

    def complete_state_dict(self, state_dict: StateDict) -> StateDict:
        """Rows missing in a plain checkpoint are its W_O's selected rows
        (what the layers' load hook derives)."""
        out = dict(state_dict)
        for layer in self.layers:
            if not layer.full:
                fill_rows(out, layer.name + '.', layer.index, layer.has_bias)
        return out

    # -- the contract: parameters ----------------------------------------
    def replacements(self) -> Dict[int, List[nn.Parameter]]:
        """``id(W_O weight or bias) -> [its rows]`` (``rank='full'``: W_O
        itself trains and keeps its place)."""
        out: Dict[int, List[nn.Parameter]] = {}
        for layer in self.layers:
            if layer.full:
                continue
            m = layer.module
            out[id(m._parameters['weight'])] = [m._parameters['apla_weight']]
            if layer.has_bias:
                out[id(m._parameters['bias'])] = [m._parameters['apla_bias']]
        return out

    def shadow_parameters(self) -> List[nn.Parameter]:
        """The rows: they duplicate entries of W_O."""
        return [
            p for layer in self.layers if not layer.full
            for p in layer.trainable_parameters()
        ]

    # -- the contract: checkpoints ---------------------------------------
    def config_problems(self, saved: APLAConfig) -> List[str]:
        """Rank, seed (unless the channels come from a file or the norms),
        selection, targets and frozen modules must match."""
        current = self.config
        problems = []
        for key in ('rank', 'seed', 'selection', 'targets', 'frozen_modules'):
            if key == 'seed' and (current.index_file
                                  or current.selection == 'norm'):
                continue
            if getattr(saved, key) != getattr(current, key):
                problems.append(f'{key}: checkpoint {getattr(saved, key)!r}, '
                                f'config {getattr(current, key)!r}')
        return problems

    def resume_problems(self, meta: dict) -> List[str]:
        """As the base, and the checkpoint's channels must be the ones
        already chosen (e.g. from an index file)."""
        problems = super().resume_problems(meta)
        if not problems and not self.config.full and not self.needs_selection:
            current = self.indices()
            if any(meta['layers'][n]['index'] != current[n] for n in current):
                problems.append('selected channels differ (index_file?)')
        return problems

    def restore_(self, meta: dict) -> None:
        """Take over a resumed checkpoint's channels."""
        if not self.config.full:
            self.set_indices(
                {name: info['index']
                 for name, info in meta['layers'].items()})

    # -- the contract: delta files ---------------------------------------
    @classmethod
    def delta_entries(cls, meta: dict) -> Dict[str, Optional[List[int]]]:
        """W_O's weight and bias of every layer, with the trained rows."""
        out = {}
        for layer, info in meta['layers'].items():
            out[layer + '.weight'] = info['index']
            if info.get('has_bias', True):
                out[layer + '.bias'] = info['index']
        return out

    @classmethod
    def merge_delta_(cls, merged: StateDict, delta_state: StateDict,
                     meta: dict) -> None:
        """Nothing to fold: the rows replace the base's rows."""
