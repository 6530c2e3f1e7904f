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

How it is recorded (narrowly, and undone afterwards):
:class:`PretrainedLoadRecorder` is active from the PEFT hook's
``before_run`` (which mmengine calls before ``_init_model_weights`` and
``load_or_resume``) until the check at the start of training. While active,
mmengine's ``load_state_dict`` -- the function object bound in
``mmengine.runner.checkpoint`` and in every already imported module of
mmengine, mmcv, mmseg, mmdet, mmpretrain and apla_mm that imported it by
name, such as ``mmseg.models.backbones.vit`` -- is replaced by a wrapper that
compares the given state dict with the module's (keys and shapes) and then
calls the original unchanged. ``TimmViT`` reports its loads itself
(:func:`record_pretrained_load`).

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
import sys
import weakref
from dataclasses import dataclass, field
from typing import (Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

import torch.nn as nn

_SCANNED_PACKAGES = ('mmengine', 'mmcv', 'mmseg', 'mmdet', 'mmpretrain',
                     'apla_mm')


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
_PATCHED: Dict[str, Callable] = {}


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


def record_pretrained_load(
        module: nn.Module,
        state_dict: Mapping,
        source: Optional[str] = None,
        ignore_unexpected: Optional[Callable[[str], bool]] = None) -> None:
    """Tell the active recorders that ``state_dict`` is loaded into
    ``module`` (call it before loading). A no-op when none is active.

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
    for key, shape in own.items():
        if key not in state_dict:
            if not key.endswith('num_batches_tracked'):
                load.missing.append(key)
        elif _shape(state_dict[key]) != shape:
            load.mismatched.append((key, _shape(state_dict[key]), shape))
        else:
            load.provided.append(key)
    heads = {k.split('.', 1)[0] for k in own}
    for key in state_dict:
        if key in own or (ignore_unexpected and ignore_unexpected(key)):
            continue
        if key.split('.', 1)[0] in heads:
            load.unexpected.append(key)
    for recorder in _ACTIVE:
        recorder.loads.append(load)


def _patch() -> None:
    import mmengine.runner.checkpoint as ckpt_module
    original = ckpt_module.load_state_dict

    def load_state_dict(module, state_dict, strict=False, logger=None):
        try:
            record_pretrained_load(module, state_dict)
        except Exception:  # recording must never break a load
            pass
        return original(module, state_dict, strict=strict, logger=logger)

    load_state_dict.__wrapped__ = original  # type: ignore[attr-defined]
    for name, mod in list(sys.modules.items()):
        if mod is None or not name.startswith(_SCANNED_PACKAGES):
            continue
        if getattr(mod, 'load_state_dict', None) is original:
            _PATCHED[name] = original
            setattr(mod, 'load_state_dict', load_state_dict)


def _unpatch() -> None:
    for name, original in _PATCHED.items():
        mod = sys.modules.get(name)
        if mod is not None:
            setattr(mod, 'load_state_dict', original)
    _PATCHED.clear()


class PretrainedLoadRecorder:
    """Record the loads of weights into modules while active.

    Use as a context manager or with :meth:`start`/:meth:`stop`; several
    recorders may be active at once (mmengine's function is patched while at
    least one is).
    """

    def __init__(self) -> None:
        self.loads: List[PretrainedLoad] = []

    @property
    def active(self) -> bool:
        return self in _ACTIVE

    def start(self) -> 'PretrainedLoadRecorder':
        if not self.active:
            if not _ACTIVE:
                _patch()
            _ACTIVE.append(self)
        return self

    def stop(self) -> List[PretrainedLoad]:
        if self.active:
            _ACTIVE.remove(self)
            if not _ACTIVE:
                _unpatch()
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
