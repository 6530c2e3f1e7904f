"""The contract every PEFT method of apla_mm fills in.

A method is three things, in the style of HF peft's tuners
(``tuners/<method>/{config,layer,model}.py``, ``PeftConfig``,
``BaseTuner``/``BaseTunerLayer``):

* a **config** (:class:`PeftConfig` subclass): a small dataclass whose
  ``targets``, ``frozen_modules`` and ``with_cp`` mean the same for every
  method and are normalised here;
* a **layer** record (:class:`AdaptedLayer` subclass) per adapted weight,
  with the tensors it trains;
* an **adapter** (:class:`BaseAdapter` subclass) applied to a built model.
  The base does what every method does in the same way:

  - construction: checks ``frozen_modules`` exist, finds the targets with
    the shared grammar (:mod:`apla_mm.peft.targets`), freezes, lets the
    method inject itself into each layer (:meth:`BaseAdapter._inject`),
    and sets up ``with_cp`` (:mod:`apla_mm.peft.checkpointing`);
  - parameters: :meth:`~BaseAdapter.adapted_parameters`,
    :meth:`~BaseAdapter.replacements` (for moving a built optimizer),
    :meth:`~BaseAdapter.shadow_parameters`,
    :meth:`~BaseAdapter.num_trainable`;
  - keeping stand-ins and weights consistent: :meth:`~BaseAdapter.refresh_`
    (weights -> trainable tensors, after loading),
    :meth:`~BaseAdapter.sync_` (trainable tensors -> weights) and
    :meth:`~BaseAdapter.attach_optimizer` (when to sync);
  - checkpoints: :meth:`~BaseAdapter.meta` (stored under
    ``meta[META_KEY]``), :meth:`~BaseAdapter.resume_problems`,
    :meth:`~BaseAdapter.restore_`;
  - delta files, from the meta alone (no model needed):
    :meth:`~BaseAdapter.delta_entries`, :meth:`~BaseAdapter.new_entries`,
    :meth:`~BaseAdapter.merge_delta_` (used by :mod:`apla_mm.peft.delta`);
  - removal: :meth:`~BaseAdapter.merge_and_unload`,
    :meth:`~BaseAdapter.unload`.

Subclasses set :attr:`BaseAdapter.method` (which registers them for
:func:`adapter_class`), :attr:`~BaseAdapter.config_class`,
:attr:`~BaseAdapter.default_targets` and implement
:meth:`~BaseAdapter._make_layer`, :meth:`~BaseAdapter._inject` and
:meth:`~BaseAdapter._eject`. The mmengine side is one hook per method
(:class:`~apla_mm.engine.hooks.peft_hook.BasePEFTHook`), which only builds
the adapter and connects it to the Runner. ``docs/architecture.md`` walks
through adding a method.
"""
import dataclasses
from dataclasses import asdict, dataclass
from typing import (ClassVar, Dict, List, Optional, Sequence, Tuple, Type,
                    TypeVar)

import torch
import torch.nn as nn

from .checkpointing import (disable_block_checkpointing,
                            enable_block_checkpointing)
from .targets import Target, find_targets, normalise_targets
from .utils import remove_hooks

#: Key of an adapter's description in a checkpoint's ``meta``.
META_KEY = 'apla_mm'

StateDict = Dict[str, torch.Tensor]
C = TypeVar('C', bound='PeftConfig')


@dataclass
class PeftConfig:
    """Base of the method configs.

    Subclasses are dataclasses declaring at least ``targets``,
    ``frozen_modules`` and ``with_cp`` (each with its default), which mean:

    * ``targets`` (str | list[str] | None): shortcuts ``'proj'``/``'qkv'``
      or full-match regexes over module names
      (:mod:`apla_mm.peft.targets`); ``None`` is the method's default.
    * ``frozen_modules`` (str | list[str]): top-level modules frozen apart
      from what the method trains, e.g. ``('backbone',)``.
    * ``with_cp`` (bool): recompute the adapted blocks in backward
      (:mod:`apla_mm.peft.checkpointing`).
    """

    def __post_init__(self) -> None:
        frozen = self.frozen_modules
        if isinstance(frozen, str):
            frozen = (frozen, )
        frozen = tuple(frozen)
        if not frozen or not all(isinstance(p, str) and p for p in frozen):
            raise TypeError('frozen_modules must be a non-empty list of '
                            f'module names, got {self.frozen_modules!r}')
        self.frozen_modules = frozen
        self.targets = normalise_targets(self.targets)
        if not isinstance(self.with_cp, bool):
            raise TypeError(f'with_cp must be True or False, got '
                            f'{self.with_cp!r}')

    def to_dict(self) -> dict:
        """JSON-able settings (stored in checkpoints and compared on
        resume)."""
        out = asdict(self)
        out['frozen_modules'] = list(self.frozen_modules)
        if self.targets is not None:
            out['targets'] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls: Type[C], data: dict) -> C:
        """The config a :meth:`to_dict` record describes; keys a newer or
        older apla_mm wrote that this version does not know are ignored and
        missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AdaptedLayer:
    """One adapted weight ``module.<param>`` (``out x in``)."""
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
        """The tensors the method trains for this layer."""
        raise NotImplementedError


_ADAPTERS: Dict[str, Type['BaseAdapter']] = {}


def adapter_class(method: Optional[str]) -> Type['BaseAdapter']:
    """The adapter class of a method name stored in a checkpoint meta."""
    if method not in _ADAPTERS:
        raise ValueError(
            f'unknown PEFT method {method!r} in the checkpoint meta; apla_mm '
            f'knows {sorted(_ADAPTERS)}.')
    return _ADAPTERS[method]


def check_frozen_modules(model: nn.Module, frozen_modules: Sequence[str]
                         ) -> None:
    """Raise a clear error unless every frozen module exists."""
    for prefix in frozen_modules:
        try:
            model.get_submodule(prefix)
        except AttributeError as e:
            raise ValueError(
                f'frozen module {prefix!r} does not exist in '
                f'{type(model).__name__}; its top-level modules are '
                f'{[n for n, _ in model.named_children()]}') from e


class BaseAdapter:
    """A PEFT method applied to a model (see the module docstring).

    Args:
        model (nn.Module): The full model (segmentor/detector); names of
            targets and of ``config.frozen_modules`` are relative to it.
        config (PeftConfig): The method's settings, an instance of
            :attr:`config_class`.
    """

    #: Name stored in checkpoints (``meta[META_KEY]['method']``).
    method: ClassVar[str] = ''
    #: Version of the method's meta/delta layout.
    format: ClassVar[int] = 1
    config_class: ClassVar[Type[PeftConfig]] = PeftConfig
    #: Targets used when ``config.targets`` is ``None``.
    default_targets: ClassVar[Tuple[str, ...]] = ('proj', )

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _ADAPTERS[cls.method] = cls

    def __init__(self, model: nn.Module, config: PeftConfig) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f'{type(self).__name__} needs a '
                            f'{self.config_class.__name__}, got '
                            f'{type(config).__name__}')
        self.model = model
        self.config = config
        self._hooks: Dict[str, object] = {}
        check_frozen_modules(model, config.frozen_modules)
        targets = find_targets(model, config.targets, config.frozen_modules,
                               self.default_targets)
        self.layers: List[AdaptedLayer] = [
            self._make_layer(t) for t in targets
        ]
        for prefix in config.frozen_modules:
            model.get_submodule(prefix).requires_grad_(False)
        for layer in self.layers:
            self._inject(layer)
        self.checkpointed_blocks: List[str] = (
            enable_block_checkpointing(
                model, [layer.name for layer in self.layers])
            if config.with_cp else [])

    # -- to implement ----------------------------------------------------
    def _make_layer(self, target: Target) -> AdaptedLayer:
        """Check a target and describe it as the method's layer record."""
        raise NotImplementedError

    def _inject(self, layer: AdaptedLayer) -> None:
        """Create the layer's trainable tensors and swap its behaviour."""
        raise NotImplementedError

    def _eject(self, layer: AdaptedLayer) -> None:
        """Undo :meth:`_inject` (the weights already hold what to keep)."""
        raise NotImplementedError

    def layer_meta(self, layer: AdaptedLayer) -> dict:
        """JSON-able description of one layer for :meth:`meta`."""
        return dict(param=layer.param, out_features=layer.out_features,
                    in_features=layer.in_features)

    # -- parameters ------------------------------------------------------
    def adapted_parameters(self) -> List[nn.Parameter]:
        """Every tensor the method trains inside the frozen modules."""
        return [p for layer in self.layers
                for p in layer.trainable_parameters()]

    def num_trainable(self) -> int:
        """Trainable entries inside the frozen modules."""
        return sum(p.numel() for p in self.adapted_parameters())

    def replacements(self) -> Dict[int, List[nn.Parameter]]:
        """``id(original parameter) -> its trainable stand-ins``, for moving
        an optimizer built on the unmodified model
        (:func:`~apla_mm.peft.optim.rebind_optimizer`): the stand-ins take
        the original's place and settings."""
        return {id(layer.module._parameters[layer.param]):
                layer.trainable_parameters() for layer in self.layers}

    def shadow_parameters(self) -> List[nn.Parameter]:
        """Trainable tensors that duplicate entries of existing weights (not
        new parameters, so not counted in the model's size)."""
        return []

    # -- keeping trainable tensors and weights consistent -----------------
    def refresh_(self) -> None:
        """Re-derive the trainable tensors from the current weights (after
        they were initialised or loaded). Nothing to do by default."""

    def sync_(self) -> None:
        """Write the trainable tensors into the weights. Nothing to do by
        default."""

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the weights consistent with what ``optimizer`` trains (e.g.
        :meth:`sync_` after each step). Nothing to do by default."""

    # -- checkpoints -----------------------------------------------------
    def meta(self) -> dict:
        """JSON-able description stored in checkpoints (``meta[META_KEY]``)
        and read by the delta tools."""
        return dict(
            method=self.method,
            format=self.format,
            config=self.config.to_dict(),
            frozen_modules=list(self.config.frozen_modules),
            layers={layer.name: self.layer_meta(layer)
                    for layer in self.layers})

    def resume_problems(self, meta: dict) -> List[str]:
        """Why a checkpoint with this meta cannot be resumed with the
        current settings (empty if it can): differing settings
        (:meth:`config_problems`) or adapted layers."""
        problems = self.config_problems(
            self.config_class.from_dict(meta.get('config') or {}))
        if sorted(meta.get('layers') or {}) != sorted(
                layer.name for layer in self.layers):
            problems.append('adapted layers differ')
        return problems

    def config_problems(self, saved: PeftConfig) -> List[str]:
        """The settings in which a checkpoint's config differs from the
        current one (by default: every field)."""
        current = self.config.to_dict()
        return [
            f'{key}: checkpoint {value!r}, config {current[key]!r}'
            for key, value in saved.to_dict().items() if value != current[key]
        ]

    def restore_(self, meta: dict) -> None:
        """Take over what a resumed checkpoint decided (before its weights
        load). Nothing to do by default."""

    # -- delta files (from the meta alone) --------------------------------
    @classmethod
    def delta_entries(cls, meta: dict) -> Dict[str, Optional[List[int]]]:
        """State-dict keys inside the frozen modules whose trained values a
        delta stores, with the rows it stores (``None``: all of them); they
        replace the base's values on merging."""
        return {}

    @classmethod
    def new_entries(cls, meta: dict) -> List[str]:
        """Trained state-dict keys that the base model does not have (e.g.
        LoRA's factors); a delta stores them whole, merging folds them
        in (:meth:`merge_delta_`)."""
        return []

    @classmethod
    def base_entries(cls, meta: dict) -> List[str]:
        """Keys the base model must have for a delta to merge."""
        return list(cls.delta_entries(meta))

    @classmethod
    def merge_delta_(cls, merged: StateDict, delta_state: StateDict,
                     meta: dict) -> None:
        """Fold :meth:`new_entries` into ``merged`` (in place). Nothing to do
        by default."""

    # -- removal ---------------------------------------------------------
    def _merge_(self) -> None:
        """Fold the trainable tensors into the weights for good."""
        self.sync_()

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Remove the method, leaving the plain model (module classes and
        state-dict keys of the base) with the trained weights."""
        self._merge_()
        return self._remove()

    def unload(self) -> nn.Module:
        """Remove the method. Weights keep what :meth:`sync_` writes (APLA:
        the trained rows; LoRA: the base weights, without the update)."""
        self.sync_()
        return self._remove()

    def _remove(self) -> nn.Module:
        remove_hooks(self._hooks)
        disable_block_checkpointing(self.model, self.checkpointed_blocks)
        self.checkpointed_blocks = []
        for layer in self.layers:
            self._eject(layer)
        self.layers = []
        return self.model
