"""Stop a run whose frozen backbone did not get all its pretrained weights.

A PEFT method freezes the backbone: whatever did not load from the
pretrained file stays at its random initialisation for the whole run.
Backbones load their files non-strictly and only log what was missing --
mmseg's ``VisionTransformer.init_weights`` and mmengine's ``PretrainedInit``
call mmengine's ``load_state_dict(strict=False)``
(``mmengine/runner/checkpoint.py``), which prints the mismatches;
:meth:`apla_mm.models.TimmViT.load_pretrained` logs them. So the PEFT hooks
record every load of weights into the model while it is initialised, and
refuse to train when a frozen module ends up incomplete.

How it is recorded, whichever loader runs, with nothing patched:
:class:`PretrainedLoadRecorder` registers torch's per-module load-state-dict
pre-hooks (:func:`apla_mm.compat.register_load_state_dict_pre_hook`) on
every module of the frozen modules and on the model, from the PEFT hook's
``before_run`` (which mmengine calls before ``_init_model_weights`` and
``load_or_resume``) until the check at the start of training. Every loader
-- ``nn.Module.load_state_dict``, mmengine's ``load_state_dict`` function
(mmseg's ``VisionTransformer.init_weights``, ``PretrainedInit``,
``load_from``, ``--resume``) -- calls ``_load_from_state_dict`` on each
module, which runs the pre-hooks with the entries offered. Each hook compares
its module's own entries (keys and shapes) with them; the hook of the module
a load starts from also notes the file's entries the module does not have.
Loaders that filter a file before loading it (``TimmViT``) report the whole
file themselves (:func:`record_pretrained_load`).

What counts as incomplete, per entry of a frozen module: missing in the
file, present with another shape, or -- for entries of the file that the
module does not have -- "unexpected" when the entry's first name component
is one the module has (``blocks.5...`` for a 4-block ViT: a file of another
architecture; ``head.weight`` of a classification file is ignored). An
entry that a later load provides (``load_from``, ``--resume``) is complete.
Entries created by the adapter itself (LoRA factors) are never expected in
a pretrained file.

Intentional partial loads are allowed with regexes full-matched against the
model's entry names (e.g. ``'backbone\\.pos_embed'`` or
``'backbone\\.vit\\.blocks\\.[23]\\..*'``; ``'.*'`` allows everything):
``allow_partial_pretrained = [...]`` at the top level of the config, or
``tools/train.py --allow-partial-pretrained REGEX ...``. The allowed entries
are then listed as a warning.
"""
import re
import weakref
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

import torch.nn as nn

from apla_mm.compat import register_load_state_dict_pre_hook


class IncompletePretrainedLoadError(RuntimeError):
    """Pretrained weights of a frozen module did not load completely."""


@dataclass
class PretrainedLoad:
    """One load of a state dict into a module."""
    module: 'weakref.ref'
    source: str
    provided: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)


_ACTIVE: List['PretrainedLoadRecorder'] = []


def _shape(value) -> Optional[tuple]:
    return tuple(value.shape) if hasattr(value, 'shape') else None


def _describe_source(module: nn.Module) -> str:
    init_cfg = getattr(module, 'init_cfg', None)
    if isinstance(init_cfg, dict) and init_cfg.get('checkpoint'):
        return str(init_cfg['checkpoint'])
    if isinstance(init_cfg, (list, tuple)):
        for cfg in init_cfg:
            if isinstance(cfg, dict) and cfg.get('checkpoint'):
                return str(cfg['checkpoint'])
    return 'a state dict'


_MISSING = object()


def _compare(load: 'PretrainedLoad', own: Mapping[str, Optional[tuple]],
             state_dict: Mapping, prefix: str = '') -> None:
    for key, shape in own.items():
        offered = state_dict.get(prefix + key, _MISSING)
        if offered is _MISSING:
            if not key.endswith('num_batches_tracked'):
                load.missing.append(key)
        elif _shape(offered) != shape:
            load.mismatched.append((key, _shape(offered), shape))
        else:
            load.provided.append(key)


def _unexpected(own: Mapping, state_dict: Mapping,
                ignore: Optional[Callable[[str], bool]] = None) -> List[str]:
    # Entries of the file under a first name component the module has
    # (``blocks.5...`` for a 4-block ViT); others (a classifier ``head``)
    # belong to parts the file's model had and this one never has.
    heads = {k.split('.', 1)[0] for k in own}
    return [key for key in state_dict
            if key not in own and not (ignore and ignore(key))
            and key.split('.', 1)[0] in heads]


def record_pretrained_load(
        module: nn.Module,
        state_dict: Mapping,
        source: Optional[str] = None,
        ignore_unexpected: Optional[Callable[[str], bool]] = None) -> None:
    """Tell the active recorders that ``state_dict`` is loaded into
    ``module`` (call it before loading), for loaders that load only part of
    a file. A no-op when none is active.

    Args:
        module (nn.Module): The module receiving the weights.
        state_dict (Mapping): The weights, keyed relative to ``module``.
        source (str, optional): The file, for messages.
        ignore_unexpected (callable, optional): ``key -> bool`` for entries
            of the file that are left out on purpose (e.g. blocks a
            backbone pruned).
    """
    if not _ACTIVE:
        return
    own = {k: _shape(v) for k, v in module.state_dict().items()}
    load = PretrainedLoad(weakref.ref(module), source
                          or _describe_source(module))
    _compare(load, own, state_dict)
    load.unexpected = _unexpected(own, state_dict, ignore_unexpected)
    for recorder in _ACTIVE:
        recorder.loads.append(load)


def _own_entries(module: nn.Module) -> Dict[str, Optional[tuple]]:
    """A module's own (not its children's) state-dict entries."""
    out = {n: _shape(p) for n, p in module._parameters.items()
           if p is not None}
    out.update({n: _shape(b) for n, b in module._buffers.items()
                if b is not None
                and n not in module._non_persistent_buffers_set})
    return out


class PretrainedLoadRecorder:
    """Record the loads of weights into a model's modules while active.

    Use as a context manager or with :meth:`start`/:meth:`stop`. Registers
    load-state-dict pre-hooks on ``model`` and on every module of
    ``within`` (see the module docstring) and removes them on :meth:`stop`.
    Several recorders may be active at once.

    Args:
        model (nn.Module): The (unwrapped) model.
        within (Sequence[str]): Top-level modules whose loads are compared
            entry by entry (the frozen modules).
    """

    def __init__(self, model: nn.Module,
                 within: Sequence[str] = ('', )) -> None:
        self.model = model
        self.within = tuple(within)
        self.loads: List[PretrainedLoad] = []
        self._handles: list = []
        self._sources: Dict[int, str] = {}

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    def _hook(self, module, state_dict, prefix, *args) -> None:
        try:
            load = PretrainedLoad(weakref.ref(module),
                                  self._sources.get(id(module),
                                                    'a state dict'))
            _compare(load, _own_entries(module), state_dict, prefix)
            if not prefix:  # the module the load started from
                own = {k: _shape(v)
                       for k, v in module.state_dict().items()}
                load.unexpected = _unexpected(own, state_dict)
            if load.missing or load.mismatched or load.provided \
                    or load.unexpected:
                self.loads.append(load)
        except Exception:  # recording must never break a load
            pass

    def start(self) -> 'PretrainedLoadRecorder':
        if not self.active:
            modules = {id(self.model): self.model}
            by_name: Dict[str, str] = {}
            self._sources = {}
            for name, module in self.model.named_modules():
                # the file named by the nearest init_cfg at or above
                own = _describe_source(module)
                parent = by_name.get(name.rpartition('.')[0], 'a state dict')
                by_name[name] = own if own != 'a state dict' else parent
                self._sources[id(module)] = by_name[name]
                if '' in self.within or _in_modules(name, self.within):
                    modules[id(module)] = module
            self._handles = [
                register_load_state_dict_pre_hook(m, self._hook)
                for m in modules.values()
            ]
            _ACTIVE.append(self)
        return self

    def stop(self) -> List[PretrainedLoad]:
        if self.active:
            _ACTIVE.remove(self)
            for handle in self._handles:
                handle.remove()
            self._handles = []
        return self.loads

    def __enter__(self) -> 'PretrainedLoadRecorder':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class IncompleteEntries:
    """Entries of frozen modules that the loads left incomplete."""
    #: full name -> (problem, source)
    problems: Dict[str, Tuple[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.problems)

    def describe(self, limit: int = 6) -> str:
        groups: Dict[str, List[str]] = {}
        for key, (problem, _) in self.problems.items():
            groups.setdefault(problem.split(':', 1)[0], []).append(
                key if ':' not in problem else
                f'{key} ({problem.split(":", 1)[1].strip()})')
        sources = sorted({src for _, src in self.problems.values()})
        parts = [
            f'{len(keys)} {label} (e.g. {", ".join(keys[:limit])})'
            for label, keys in groups.items()
        ]
        return '; '.join(parts) + f' [from {", ".join(sources)}]'


def _in_modules(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def incomplete_entries(model: nn.Module,
                       loads: Sequence[PretrainedLoad],
                       frozen_modules: Sequence[str],
                       exclude: Iterable[str] = ()) -> IncompleteEntries:
    """What the recorded loads left incomplete in ``frozen_modules``.

    Args:
        model (nn.Module): The (unwrapped) model; names are relative to it.
        loads (Sequence[PretrainedLoad]): In the order they happened.
        frozen_modules (Sequence[str]): Top-level names frozen by the method.
        exclude (Iterable[str]): Entry names never expected in a pretrained
            file (e.g. adapter parameters).
    """
    names = {id(m): n for n, m in model.named_modules()}
    excluded = set(exclude)
    problems: Dict[str, Tuple[str, str]] = {}
    for load in loads:
        module = load.module()
        if module is None or id(module) not in names:
            continue
        prefix = names[id(module)]
        prefix = prefix + '.' if prefix else ''
        for key in load.provided:
            problems.pop(prefix + key, None)
        for key in load.missing:
            problems[prefix + key] = ('missing in the file', load.source)
        for key, theirs, mine in load.mismatched:
            problems[prefix + key] = (
                f'of another shape: file {theirs} vs model {mine}',
                load.source)
        for key in load.unexpected:
            problems[prefix + key] = (
                'in the file but not in the model', load.source)
    kept = {
        k: v
        for k, v in problems.items()
        if _in_modules(k, frozen_modules) and k not in excluded
    }
    return IncompleteEntries(kept)


def split_allowed(entries: IncompleteEntries, patterns: Sequence[str]
                  ) -> Tuple[IncompleteEntries, IncompleteEntries]:
    """``(refused, allowed)``: entries full-matching one of ``patterns``
    are allowed."""
    compiled = [re.compile(p) for p in patterns]
    refused, allowed = IncompleteEntries(), IncompleteEntries()
    for key, value in entries.problems.items():
        target = allowed if any(c.fullmatch(key) for c in compiled) \
            else refused
        target.problems[key] = value
    return refused, allowed


def check_frozen_pretrained(model: nn.Module,
                            loads: Sequence[PretrainedLoad],
                            frozen_modules: Sequence[str],
                            method: str,
                            allow: Sequence[str] = (),
                            exclude: Iterable[str] = ()
                            ) -> IncompleteEntries:
    """Raise if pretrained weights of a frozen module did not load fully.

    Args:
        model (nn.Module): The unwrapped model.
        loads (Sequence[PretrainedLoad]): From a
            :class:`PretrainedLoadRecorder`.
        frozen_modules (Sequence[str]): The modules the method freezes.
        method (str): For the message (``'apla'``, ``'lora'``).
        allow (Sequence[str]): ``allow_partial_pretrained`` regexes.
        exclude (Iterable[str]): Entry names not expected in a file.

    Returns:
        IncompleteEntries: The allowed incomplete entries (empty if none).

    Raises:
        IncompletePretrainedLoadError: Listing what did not load and how to
            allow it.
    """
    entries = incomplete_entries(model, loads, frozen_modules, exclude)
    refused, allowed = split_allowed(entries, allow)
    if refused:
        raise IncompletePretrainedLoadError(
            f'{method.upper()} freezes {", ".join(frozen_modules)}, but its '
            f'pretrained weights did not load completely: '
            f'{refused.describe()}. These entries would stay at their random '
            'initialisation, frozen, for the whole run. Fix the pretrained '
            'file or the architecture (e.g. model_kwargs/depth/embed_dims, '
            "init_cfg['prefix']), or, if this is intended (e.g. a file "
            'without some of these entries), allow them with regexes over '
            'these names: allow_partial_pretrained = [...] in the config, '
            'or tools/train.py --allow-partial-pretrained REGEX ...')
    return allowed
