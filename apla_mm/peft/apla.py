"""APLA: train r output channels of every attention output projection W_O.

Sorkhei et al., "APLA: A Simple Adaptation Method for Vision Transformers",
arXiv 2503.11335. For every targeted W_O (an ``out x in`` weight and its
bias) a fixed random subset of ``r`` output channels (rows of the weight,
with their bias entries) is chosen once per layer; only these train, the rest
of the backbone is frozen. Nothing is added to the architecture.

How it is implemented here
--------------------------
The selected rows live in a small trainable parameter per layer,
``apla_weight`` (``r x in``) and ``apla_bias`` (``r``), registered on the
projection module. The module's ``weight``/``bias`` parameters stay where
they are, frozen, and always hold the *merged* values: after every optimizer
step the adapter copies the rows back into them (:meth:`APLAAdapter.sync_`,
run by an optimizer step post-hook that :meth:`APLAAdapter.attach_optimizer`
installs, so any optimizer wrapper works — mmengine's ``OptimWrapper`` and
``AmpOptimWrapper`` included; a step that a loss scaler skips calls no
post-hook and changes nothing). The projection's class gets
``weight``/``bias`` properties (the mechanism of
:mod:`torch.nn.utils.parametrize`) that, while a graph is recorded, return
the frozen tensor itself through an identity autograd function whose backward
hands the selected rows of the gradient to ``apla_weight``/``apla_bias``.
This works for layers called as modules (timm, mmpretrain) and for
``nn.MultiheadAttention.out_proj`` (mmseg), whose forward only reads
``out_proj.weight``. Consequences:

* frozen entries, the unselected rows of W_O included, are never written, so
  they stay bit-identical under any optimizer (weight decay, momentum), AMP,
  clipping or gradient accumulation;
* gradients and optimizer state exist for the ``r`` rows only;
* no extra weight copy is made or kept for backward, and with grad disabled
  (inference) the properties return the plain parameters;
* ``state_dict()`` has exactly the keys of the unmodified model and holds the
  merged weights, so checkpoints are plain model checkpoints.

Projections that are plain ``nn.Linear`` modules (timm, mmpretrain) also get
a ``forward`` whose backward computes the weight gradient for the ``r``
selected rows only (``grad[..., rows]^T @ x``) instead of all ``out`` rows:
the same values (up to float summation order), ``r/out`` of the
weight-gradient work.
"""
import hashlib
import json
import os.path as osp
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .targets import ATTN_OUT_PATTERNS, Patterns, as_pattern_list, find_modules
from .utils import (disable_block_checkpointing, enable_block_checkpointing,
                    remove_hooks, restore_class, swap_class)

Rank = Union[int, float, str]
SELECTIONS = ('random', 'norm')


def check_rank(rank: Rank) -> Rank:
    """Validate an APLA rank: a positive int, a fraction in ``(0, 1)`` or
    ``'full'``."""
    if isinstance(rank, str):
        if rank != 'full':
            raise ValueError(
                f"APLA rank must be a positive integer, a fraction in (0, 1) "
                f"or 'full', got {rank!r}.")
        return rank
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise TypeError(
                f'A fractional APLA rank must lie in (0, 1) (the share of '
                f"each layer's output channels), got {rank}; use an integer "
                "for a channel count or rank='full' for all of W_O.")
        return rank
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(
            f'APLA rank must be a positive integer (number of output channels'
            f" per layer), a fraction in (0, 1) or 'full', got {rank!r} of "
            f'type {type(rank).__name__}.')
    if rank <= 0:
        raise ValueError(f'APLA rank must be > 0, got {rank}.')
    return rank


def layer_rank(rank: Rank, out_features: int, name: str = 'the layer') -> int:
    """Channels APLA trains in a layer with ``out_features`` outputs.

    * an ``int`` is the same count in every layer; it must not exceed any
      layer's width (Swin's stages are 96...768 channels wide at Swin-T, so
      ``rank=128`` fails on the first stage with an error naming it);
    * a ``float`` in ``(0, 1)`` is the share of each layer's channels,
      ``max(1, round(rank * out_features))`` (``rank=0.125`` trains 12, 24,
      48 and 96 channels in Swin-T's four stages, 96 of 768 in ViT-B);
    * ``'full'`` is every channel.
    """
    if rank == 'full':
        return out_features
    if isinstance(rank, float):
        return max(1, min(out_features, int(round(rank * out_features))))
    if rank > out_features:
        raise ValueError(
            f'APLA rank {rank} exceeds the {out_features} output channels of '
            f'{name}; use rank <= {out_features}, a share of each '
            "layer's channels (a float in (0, 1), e.g. rank=0.25), or "
            "rank='full'.")
    return rank


@dataclass
class APLAConfig:
    """What APLA adapts and how it picks channels.

    Args:
        rank (int | float | str): Output channels trained per layer (an
            ``int``), the share of each layer's channels (a ``float`` in
            ``(0, 1)``, for backbones whose layers differ in width such as
            Swin), or ``'full'`` for all of W_O (see :func:`layer_rank`).
            Defaults to 64.
        seed (int): Seed of the per-layer random choice. The choice for a
            layer depends only on ``(seed, layer name, out_features, rank)``,
            so every process of a distributed run picks the same channels.
            Defaults to 0.
        targets (str | list[str], optional): Regexes full-matched against
            module names (e.g. ``'backbone.vit.blocks.*.attn.proj'``).
            ``None`` auto-detects W_O of timm ViTs (DeiT, AugReg, DINOv2,
            EVA-02, SAM, BEiT), mmseg/mmpretrain ViTs and mmseg/mmdet Swin
            (:data:`~apla_mm.peft.targets.ATTN_OUT_PATTERNS`).
        selection (str): ``'random'`` (the paper's choice) or ``'norm'``
            (the rows of largest L2 norm of the initial weights, chosen when
            training starts). Defaults to ``'random'``.
        index_file (str, optional): JSON file ``{layer name: [channels]}``
            giving the channels explicitly (also accepts the APLA repo's
            ``{"block_0": [...], ...}`` files). Overrides ``selection``.
        frozen_modules (list[str]): Top-level modules that are frozen apart
            from the APLA rows. Defaults to ``('backbone',)``.
        with_cp (bool): Recompute the activations of the transformer blocks
            in backward instead of keeping them (activation checkpointing):
            less memory, one more forward pass of the backbone. Defaults to
            False.
    """
    rank: Rank = 64
    seed: int = 0
    targets: Patterns = None
    selection: str = 'random'
    index_file: Optional[str] = None
    frozen_modules: Tuple[str, ...] = field(default=('backbone', ))
    with_cp: bool = False

    def __post_init__(self) -> None:
        check_rank(self.rank)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f'seed must be an int, got {self.seed!r}')
        if self.selection not in SELECTIONS:
            raise ValueError(f'selection must be one of {SELECTIONS}, got '
                             f'{self.selection!r}')
        if isinstance(self.frozen_modules, str):
            self.frozen_modules = (self.frozen_modules, )
        self.frozen_modules = tuple(self.frozen_modules)
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)

    @property
    def full(self) -> bool:
        return self.rank == 'full'

    def to_dict(self) -> dict:
        out = asdict(self)
        out['frozen_modules'] = list(self.frozen_modules)
        if isinstance(self.targets, tuple):
            out['targets'] = list(self.targets)
        return out


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from ``(seed, layer name)``, the same on every
    machine and process."""
    digest = hashlib.sha256(f'apla:{seed}:{name}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & ((1 << 63) - 1)


def random_channels(out_features: int, rank: int, seed: int,
                    name: str) -> torch.Tensor:
    """``rank`` distinct channels of ``range(out_features)``, sorted."""
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    perm = torch.randperm(out_features, generator=generator)
    return perm[:rank].sort().values


def norm_channels(weight: torch.Tensor, bias: Optional[torch.Tensor],
                  rank: int) -> torch.Tensor:
    """The ``rank`` rows of largest L2 norm (bias included), sorted."""
    w = weight.detach().float()
    sq = w.pow(2).sum(1)
    if bias is not None:
        sq = sq + bias.detach().float().pow(2)
    # stable: ties keep the lower channel index
    order = torch.sort(-sq, stable=True).indices
    return order[:rank].sort().values.cpu()


class _RouteRows(torch.autograd.Function):
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


class _RowLinear(torch.autograd.Function):
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
    return _RowLinear.apply(input, weight, bias, rows_w, rows_b,
                            self._buffers['apla_index'])


def _routed(module: nn.Module, name: str, rows_name: str):
    base = module._parameters[name]
    rows = module._parameters.get(rows_name)
    if base is None or rows is None or not rows.requires_grad \
            or not torch.is_grad_enabled():
        return base
    return _RouteRows.apply(base, rows, module._buffers['apla_index'])


def _weight_property(self):
    return _routed(self, 'weight', 'apla_weight')


def _bias_property(self):
    return _routed(self, 'bias', 'apla_bias')


_APLA_NAMESPACE = {
    'weight': property(_weight_property),
    'bias': property(_bias_property),
}
# plain nn.Linear projections: the same, plus the row-only backward
_APLA_LINEAR_NAMESPACE = dict(_APLA_NAMESPACE, forward=_linear_forward)


def _drop_rows_from_state_dict(module, state_dict, prefix, local_metadata):
    # ``weight``/``bias`` already hold the merged values.
    state_dict.pop(prefix + 'apla_weight', None)
    state_dict.pop(prefix + 'apla_bias', None)


def _rows_from_state_dict(module, state_dict, prefix, *args):
    # A plain checkpoint (or our own) provides the merged ``weight``; the
    # trainable rows are its selected rows.
    index = module._buffers['apla_index']
    for name, rows in (('weight', 'apla_weight'), ('bias', 'apla_bias')):
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
class APLALayer:
    """One adapted projection."""
    name: str
    module: nn.Module
    out_features: int
    in_features: int
    has_bias: bool
    full: bool
    #: Channels trained in this layer (:func:`layer_rank` of the config).
    target_rank: int = 0

    @property
    def index(self) -> Optional[torch.Tensor]:
        return None if self.full else self.module._buffers['apla_index']

    @property
    def rank(self) -> int:
        return self.out_features if self.full else int(self.index.numel())

    def trainable_parameters(self) -> List[nn.Parameter]:
        m = self.module
        if self.full:
            return [p for p in (m._parameters['weight'],
                                m._parameters.get('bias')) if p is not None]
        return [p for p in (m._parameters['apla_weight'],
                            m._parameters.get('apla_bias')) if p is not None]


class APLAAdapter:
    """APLA applied to a model: selection, freezing, syncing, unloading.

    Build it once the model exists (the :class:`~apla_mm.engine.APLAHook`
    does so before training starts)::

        adapter = APLAAdapter(model, APLAConfig(rank=64, seed=0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable)   # rows + neck/heads
        adapter.attach_optimizer(optimizer)        # sync_() after each step
        loss.backward(); optimizer.step()

    (``trainable`` holds the rows ``apla_weight``/``apla_bias``, not the
    frozen W_O; :class:`~apla_mm.engine.APLAHook` instead moves an optimizer
    that was built on the unmodified model onto the rows.)

    Args:
        model (nn.Module): The full model (segmentor/detector); names of
            targets and of ``config.frozen_modules`` are relative to it.
        config (APLAConfig): Method settings.
    """

    def __init__(self, model: nn.Module, config: APLAConfig) -> None:
        self.model = model
        self.config = config
        self._hooks: Dict[str, object] = {}
        self._selected = False
        for prefix in config.frozen_modules:
            try:
                model.get_submodule(prefix)
            except AttributeError as e:
                raise ValueError(
                    f'frozen module {prefix!r} does not exist in '
                    f'{type(model).__name__}; its top-level modules are '
                    f'{[n for n, _ in model.named_children()]}') from e
        patterns = as_pattern_list(config.targets, ATTN_OUT_PATTERNS)
        found = find_modules(model, patterns, within=config.frozen_modules)
        self.layers: List[APLALayer] = []
        for name, module in found:
            weight = module._parameters['weight']
            bias = module._parameters.get('bias')
            out_features, in_features = weight.shape
            self.layers.append(
                APLALayer(name, module, out_features, in_features, bias
                          is not None, config.full,
                          layer_rank(config.rank, out_features, name)))
        self._freeze()
        self._inject()
        self.checkpointed_blocks: List[str] = (
            enable_block_checkpointing(
                model, [layer.name for layer in self.layers])
            if config.with_cp else [])
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

    # ------------------------------------------------------------------
    # construction
    def _freeze(self) -> None:
        for prefix in self.config.frozen_modules:
            self.model.get_submodule(prefix).requires_grad_(False)

    def _inject(self) -> None:
        for layer in self.layers:
            m = layer.module
            weight = m._parameters['weight']
            bias = m._parameters.get('bias')
            if layer.full:
                weight.requires_grad_(True)
                if bias is not None:
                    bias.requires_grad_(True)
                continue
            rank = layer.target_rank
            m.register_buffer(
                'apla_index',
                torch.arange(rank, device=weight.device),
                persistent=False)
            m.register_parameter(
                'apla_weight',
                nn.Parameter(weight.detach()[:rank].clone()))
            if bias is not None:
                m.register_parameter(
                    'apla_bias', nn.Parameter(bias.detach()[:rank].clone()))
            plain_linear = isinstance(m, nn.Linear) \
                and type(m).forward is nn.Linear.forward
            swap_class(m, 'APLA', _APLA_LINEAR_NAMESPACE
                       if plain_linear else _APLA_NAMESPACE)
            self._hooks[layer.name + ':save'] = \
                m.register_state_dict_post_hook(_drop_rows_from_state_dict)
            self._hooks[layer.name + ':load'] = \
                m.register_load_state_dict_pre_hook(_rows_from_state_dict)

    # ------------------------------------------------------------------
    # selection
    @property
    def needs_selection(self) -> bool:
        """Whether channels still have to be chosen from the weights
        (``selection='norm'``), which :meth:`select_from_weights_` does."""
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
            buf = layer.module._buffers['apla_index']
            value = torch.as_tensor(
                list(indices[layer.name]), dtype=torch.long)
            buf.copy_(value.sort().values.to(buf.device))
        self._selected = True
        self.refresh_rows_()

    def indices(self) -> Dict[str, List[int]]:
        """Selected channels per layer (all channels for ``'full'``)."""
        return {
            layer.name: (list(range(layer.out_features)) if layer.full else
                         layer.index.tolist())
            for layer in self.layers
        }

    # ------------------------------------------------------------------
    # keeping rows and weights consistent
    @torch.no_grad()
    def sync_(self) -> None:
        """Copy the trainable rows into the frozen weights (after a step)."""
        for layer in self.layers:
            if layer.full:
                continue
            m = layer.module
            index = m._buffers['apla_index']
            m._parameters['weight'].index_copy_(
                0, index, m._parameters['apla_weight'].to(
                    m._parameters['weight'].dtype))
            if layer.has_bias:
                m._parameters['bias'].index_copy_(
                    0, index, m._parameters['apla_bias'].to(
                        m._parameters['bias'].dtype))

    @torch.no_grad()
    def refresh_rows_(self) -> None:
        """Copy the selected rows of the weights into the trainable rows
        (after the weights were initialised or loaded)."""
        for layer in self.layers:
            if layer.full:
                continue
            m = layer.module
            index = m._buffers['apla_index']
            m._parameters['apla_weight'].copy_(
                m._parameters['weight'].index_select(0, index))
            if layer.has_bias:
                m._parameters['apla_bias'].copy_(
                    m._parameters['bias'].index_select(0, index))

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

    # ------------------------------------------------------------------
    # parameters
    def replacements(self) -> Dict[int, List[nn.Parameter]]:
        """``id(original parameter) -> its trainable stand-ins`` for moving
        an optimizer that was built on the original model."""
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
        """Trainable rows that duplicate entries of existing weights (not
        new parameters of the model, so not counted in its size)."""
        return [
            p for layer in self.layers if not layer.full
            for p in layer.trainable_parameters()
        ]

    def adapted_parameters(self) -> List[nn.Parameter]:
        """All trainable parameters APLA owns (rows, or all of W_O)."""
        return [p for layer in self.layers
                for p in layer.trainable_parameters()]

    def num_trainable(self) -> int:
        """Trainable entries in the backbone: sum of ``r * (in + 1)``."""
        return sum(p.numel() for p in self.adapted_parameters())

    # ------------------------------------------------------------------
    # checkpoint meta
    def meta(self) -> dict:
        """JSON-able description stored in checkpoints (``meta['apla_mm']``)."""
        return dict(
            method='apla',
            format=1,
            config=self.config.to_dict(),
            frozen_modules=list(self.config.frozen_modules),
            layers={
                layer.name: dict(
                    rank=layer.target_rank,
                    out_features=layer.out_features,
                    in_features=layer.in_features,
                    has_bias=layer.has_bias,
                    index=(None if layer.full else layer.index.tolist()))
                for layer in self.layers
            })

    def save_index_file(self, path: str) -> None:
        """Write the selection as JSON ``{layer name: [channels]}``."""
        with open(path, 'w') as f:
            json.dump(self.indices(), f, indent=1)

    # ------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove APLA, leaving the plain model with the merged weights.

        Module classes, parameters and state-dict keys are those of the
        model before APLA; the frozen ``requires_grad`` flags stay.
        """
        self.sync_()
        remove_hooks(self._hooks)
        disable_block_checkpointing(self.model, self.checkpointed_blocks)
        self.checkpointed_blocks = []
        for layer in self.layers:
            m = layer.module
            if layer.full:
                continue
            restore_class(m)
            for name in ('apla_weight', 'apla_bias'):
                m._parameters.pop(name, None)
            m._buffers.pop('apla_index', None)
        self.layers = []
        return self.model


def check_indices(indices: Dict[str, Sequence[int]],
                  layers: Sequence[APLALayer], source: str) -> None:
    """Raise a clear error unless ``indices`` fit ``layers`` and their
    ranks (:attr:`APLALayer.target_rank`)."""
    names = [layer.name for layer in layers]
    missing = [n for n in names if n not in indices]
    extra = [n for n in indices if n not in names]
    if missing or extra:
        raise ValueError(
            f'{source} does not match the adapted layers: '
            + (f'missing {missing[:4]}{"..." if len(missing) > 4 else ""}; '
               if missing else '')
            + (f'unknown {extra[:4]}{"..." if len(extra) > 4 else ""}; '
               if extra else '') + f'expected the layers {names[:3]}...')
    for layer in layers:
        values = indices[layer.name]
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        values = list(values)
        if len(values) != layer.target_rank:
            raise ValueError(
                f'{source}: layer {layer.name} has {len(values)} channels, '
                f'but rank is {layer.target_rank}.')
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in values):
            raise ValueError(f'{source}: layer {layer.name} has non-integer '
                             'channel indices.')
        if len(set(values)) != len(values):
            raise ValueError(f'{source}: layer {layer.name} repeats '
                             'channels.')
        if min(values) < 0 or max(values) >= layer.out_features:
            raise ValueError(
                f'{source}: layer {layer.name} has channels outside '
                f'[0, {layer.out_features}).')


def load_index_file(path: str, layers: Sequence[APLALayer],
                    rank: Rank) -> Dict[str, List[int]]:
    """Read and validate a JSON index file.

    Keys are layer names as in :meth:`APLAAdapter.indices`, or the APLA
    repository's ``block_0, block_1, ...`` matched to the layers in order.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'APLA index file {path!r} does not exist.')
    if rank == 'full':
        raise ValueError("index_file cannot be combined with rank='full'.")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'APLA index file {path!r} is not valid JSON: '
                         f'{e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'APLA index file {path!r} must hold a JSON object '
                         '{layer name: [channels]}.')
    block_keys = [f'block_{i}' for i in range(len(layers))]
    if sorted(data) == sorted(block_keys):
        data = {layer.name: data[key] for layer, key in zip(layers, block_keys)}
    check_indices(data, layers, f'index file {path!r}')
    return {k: list(v) for k, v in data.items()}
