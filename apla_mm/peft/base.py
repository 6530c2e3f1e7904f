"""The contract every PEFT method of apla_mm fills in.

A method is three things, in the style of HF peft's tuners
(``tuners/<method>/{config,layer,model}.py``, ``PeftConfig``,
``BaseTuner``/``BaseTunerLayer``):

* a **config** (:class:`PeftConfig` subclass): a small dataclass whose
  ``targets`` and ``frozen_modules`` mean the same for every method and are
  normalised here. It is the one place a method's arguments are documented:
  the hooks and the build-time :func:`~apla_mm.models.PEFTModel` take the
  same keywords;
* a **layer** record (:class:`AdaptedLayer` subclass) per adapted weight,
  with the tensors it trains;
* an **adapter** (:class:`BaseAdapter` subclass) applied to a built model.
  The base does what every method does in the same way:

  - construction: checks ``frozen_modules`` exist, finds the targets with
    the shared grammar (:mod:`apla_mm.peft.targets`), freezes, lets the
    method inject itself into each layer (:meth:`BaseAdapter._inject`)
    and registers itself on the model (:func:`get_adapter`);
  - parameters: :meth:`~BaseAdapter.adapted_parameters`,
    :meth:`~BaseAdapter.replacements` (for moving a built optimizer),
    :meth:`~BaseAdapter.shadow_parameters`,
    :meth:`~BaseAdapter.num_trainable`;
  - keeping stand-ins and weights consistent: :meth:`~BaseAdapter.refresh_`
    (weights -> trainable tensors, after loading),
    :meth:`~BaseAdapter.sync_` (trainable tensors -> weights),
    :meth:`~BaseAdapter.attach_optimizer` (when to sync) and
    :meth:`~BaseAdapter.on_weights_loaded` (what to do once the run's
    weights are in place);
  - what the hooks and the benchmark ask of a method:
    :meth:`~BaseAdapter.describe` and :attr:`~BaseAdapter.frozen_note`
    (the report), :attr:`~BaseAdapter.merges_for_inference` and
    :meth:`~BaseAdapter.merge_for_inference`;
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
(:class:`~apla_mm.engine.hooks.peft_hook.PEFTHook`), which only builds
the adapter (or finds the one :func:`~apla_mm.models.PEFTModel` built) and
connects it to the Runner. ``docs/architecture.md`` walks through adding a
method. Activation checkpointing is not a method's business: it is the
memory option ``checkpoint_blocks`` (:mod:`apla_mm.memory`), the same for
every method and for full fine-tuning.
"""
import dataclasses
from dataclasses import asdict, dataclass
from typing import (ClassVar, Dict, List, Optional, Sequence, Tuple, Type,
                    TypeVar)

import torch
import torch.nn as nn

from .targets import Target, find_targets, normalise_targets
from .utils import remove_hooks

#: Key of an adapter's description in a checkpoint's ``meta``.
META_KEY = 'apla_mm'

StateDict = Dict[str, torch.Tensor]
C = TypeVar('C', bound='PeftConfig')


@dataclass
class PeftConfig:
    """Base of the method configs.

    Subclasses are dataclasses declaring at least ``targets`` and
    ``frozen_modules`` (each with its default), which mean:

    * ``targets`` (str | list[str] | None): shortcuts ``'proj'``/``'qkv'``
      or full-match regexes over module names
      (:mod:`apla_mm.peft.targets`); ``None`` is the method's default.
    * ``frozen_modules`` (str | list[str]): top-level modules frozen apart
      from what the method trains, e.g. ``('backbone',)``.
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
        missing ones take their defaults (apla_mm 0.2 stored ``with_cp``,
        now the memory option ``checkpoint_blocks``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_kwargs(cls: Type[C], owner: str, **kwargs) -> C:
        """The config of keyword arguments given to ``owner`` (a hook or
        :func:`~apla_mm.models.PEFTModel`), with a clear error for one the
        method does not have."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if 'with_cp' in unknown:
            raise TypeError(
                f'{owner}: with_cp moved to the memory options in apla_mm '
                '0.3, the same for every method: add '
                "dict(type='MemoryEfficientHook', checkpoint_blocks=True) to "
                'custom_hooks (or MemoryConfig(checkpoint_blocks=True)) and '
                'drop with_cp here.')
        if unknown:
            raise TypeError(f'{owner}: unknown argument(s) {unknown}; '
                            f'{cls.__name__} takes {names}.')
        return cls(**kwargs)


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

#: Attribute of the model under which its adapter is registered.
_ADAPTER_ATTR = '_apla_mm_adapter'


def get_adapter(model: nn.Module) -> Optional['BaseAdapter']:
    """The adapter applied to ``model`` (inside any DDP/FSDP-style
    wrapper), or ``None``."""
    from .utils import unwrap_model
    return unwrap_model(model).__dict__.get(_ADAPTER_ATTR)


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
        existing = model.__dict__.get(_ADAPTER_ATTR)
        if existing is not None:
            raise RuntimeError(
                f'{type(model).__name__} is already adapted with '
                f'{existing.method!r} (e.g. by PEFTModel in the model config '
                'and a PEFT hook at once); apply one adapter: keep either '
                "model=dict(type='PEFTModel', ...) or the hook, or unload the "
                'first.')
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
        # A plain attribute, not a submodule: no state-dict keys; pickled
        # and deep-copied with the model.
        model.__dict__[_ADAPTER_ATTR] = self

    def __getstate__(self) -> dict:
        # Pickled/deep-copied with its model (torch.save(model), EMA): the
        # copy keeps its state-dict hooks but is driven by no optimizer.
        state = dict(self.__dict__)
        state['_hooks'] = {k: v for k, v in self._hooks.items()
                           if not k.startswith('optimizer:')}
        return state

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

    def complete_state_dict(self, state_dict: StateDict) -> StateDict:
        """``state_dict`` (of the plain model, keyed as the model) with the
        method's own entries it lacks, as loading it non-strictly would
        leave them: for loaders that insist on every parameter (FSDP's full
        state dict). By default it is returned as it is."""
        return state_dict

    def on_weights_loaded(self) -> None:
        """What the method does once the run's weights are initialised or
        loaded, before the first step (the hooks call it when training
        starts; so does the benchmark). By default: :meth:`refresh_`."""
        self.refresh_()

    # -- what the report and inference ask of a method -------------------
    #: How the parameter report describes the frozen modules.
    frozen_note: ClassVar[str] = 'frozen except the adapter'
    #: Whether inference outside training needs the adapter, merged into
    #: the weights first (LoRA: its checkpoints hold factors); APLA's
    #: checkpoints are plain models.
    merges_for_inference: ClassVar[bool] = False

    def describe(self) -> str:
        """One line for the log: what is adapted and how much trains."""
        return (f'{self.method}: {len(self.layers)} adapted weights, '
                f'{self.num_trainable():,} trainable entries.')

    def merge_for_inference(self) -> nn.Module:
        """Prepare the model for validation/testing outside training:
        merge and unload if :attr:`merges_for_inference`, else nothing."""
        if self.merges_for_inference:
            return self.merge_and_unload()
        return self.model

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
        for layer in self.layers:
            self._eject(layer)
        self.layers = []
        if self.model.__dict__.get(_ADAPTER_ATTR) is self:
            del self.model.__dict__[_ADAPTER_ATTR]
        return self.model
