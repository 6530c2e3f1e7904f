"""Training memory: the exact account of one training step.

:func:`account_step` runs one training step (the model's first, from the
same initial weights for every method; AdamW's state is counted after the
step created it) and counts, in bytes, every tensor the step keeps:

``weights``
    unique storages of all parameters and buffers (APLA's trainable rows
    included: they are real tensors next to the frozen W_O);
``grads``
    unique storages of the ``.grad`` tensors after ``backward()``;
``optimizer``
    AdamW's per-parameter state (``exp_avg``, ``exp_avg_sq``). The 0-d
    ``step`` counters are left out: they are host-side scalars (4 bytes per
    tensor) and no device memory;
``saved``
    tensors saved for backward, recorded with
    :class:`torch.autograd.graph.saved_tensors_hooks` during the forward
    pass and counted once per *storage* (views of one tensor cost one
    storage; a storage saved by several ops counts once), without the
    storages of parameters and buffers (already in ``weights``) and only if
    an autograd node still holds them when the forward pass ends;
``recompute``
    activation checkpointing (``torch.utils.checkpoint``, non-reentrant):
    the inputs a checkpointed region keeps are in ``saved`` (they pass
    through the outer hooks); the tensors the region would save are
    dropped and rebuilt in backward, one region at a time. They are
    recorded in the region's forward (through the checkpoint's own pack
    hook, which sees each tensor before replacing it with a handle:
    :func:`apla_mm.compat.checkpoint_region_packs`) and
    ``recompute`` is the largest region's unique new bytes (the extra
    memory of recomputing it during backward).

``total = weights + grads + optimizer + saved + recompute``: what has to
exist at once when the backward pass starts, before any of it is freed (an
upper bound of the real peak up to allocator slack and short-lived
temporaries). It is deterministic and depends on the method, model, input
size and batch, not on the device or the allocator, so methods can be
compared exactly (kernels that save different things on different devices,
e.g. fused attention, are the only device dependence).

Every saved storage is attributed to the module that was running (deepest
``nn.Module`` in the forward call stack) and to the torch function that
saved it (outermost ``torch.*``/``F.*``/``Tensor`` call, via a
``TorchFunctionMode``); :func:`breakdown` aggregates them per module pattern
(block indices replaced by ``*``), which is where to look when a method
keeps more than it should (e.g. a frozen layer keeping its input).

The measured peak, its counterpart, is :mod:`.peak`.
"""
import contextlib
import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .abstract import is_fake
from apla_mm.compat import checkpoint_region_packs as region_packs
from .module_stack import ModuleStack

MB = 2**20


def _storage_key(t: torch.Tensor) -> Optional[Tuple[str, int, int]]:
    """``(device, data_ptr, nbytes)`` of a tensor's storage (None without
    one, e.g. sparse tensors). A fake tensor (the abstract account) has no
    data pointer: its storage is identified by its ``StorageImpl``
    (``('fake', id, nbytes)``), which views share as real views share
    their data."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if is_fake(t):
        return ('fake', s._cdata, s.nbytes())
    return (str(t.device), s.data_ptr(), s.nbytes())


def _tensor_bytes(t: torch.Tensor) -> int:
    key = _storage_key(t)
    return key[2] if key is not None else t.numel() * t.element_size()


def unique_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
        if key is None:
            total += t.numel() * t.element_size()
            continue
        if key[1] == 0 or key in seen:  # empty storages share ptr 0
            continue
        seen.add(key)
        total += key[2]
    return total


def weight_bytes(model: nn.Module) -> int:
    """Unique storages of all parameters and buffers."""
    return unique_bytes(list(model.parameters()) + list(model.buffers()))


def grad_bytes(model: nn.Module) -> int:
    """Unique storages of the parameters' ``.grad``."""
    return unique_bytes([p.grad for p in model.parameters()
                         if p.grad is not None])


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Per-parameter optimizer state tensors (0-d step counters excluded)."""
    tensors = []
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors.append(value)
    return unique_bytes(tensors)


# ----------------------------------------------------------------------
class _Packed:
    """What the graph holds instead of a saved tensor while we count."""
    __slots__ = ('tensor', '__weakref__')

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class _FunctionName(TorchFunctionMode):
    """Remembers the outermost torch function being called."""

    def __init__(self) -> None:
        super().__init__()
        self.current: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer = self.current
        if outer is None:
            self.current = getattr(func, '__name__', None) or str(func)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current = outer


@dataclass
class _Record:
    key: Optional[Tuple[str, int, int]]
    nbytes: int
    module: str
    module_type: str
    fn: str
    ref: object = None  # weakref to the _Packed (outer records)
    keep: object = None  # strong ref so storages are not reused meanwhile
    region: int = -1


@dataclass
class SavedAccount:
    """Result of :class:`SavedTensorRecorder` for one forward pass."""
    saved: int = 0
    recompute: int = 0
    regions: int = 0
    saved_entries: List[dict] = field(default_factory=list)
    recompute_entries: List[dict] = field(default_factory=list)


class SavedTensorRecorder:
    """Record the tensors a forward pass saves for backward.

    Use around the forward pass only (the loss computation included)::

        with SavedTensorRecorder(model) as rec:
            loss = model(...)
        account = rec.result   # SavedAccount, bytes
        loss.backward()

    Args:
        model (nn.Module): Whose parameters and buffers are not counted
            (their storages are weights), and whose module names are used
            in the attribution.
        attribute (bool): Record module and function names. Defaults to
            True.
    """

    def __init__(self, model: nn.Module, attribute: bool = True) -> None:
        self.model = model
        self.attribute = attribute
        self.result: Optional[SavedAccount] = None
        self._records: List[_Record] = []
        self._regions: Dict[int, int] = {}
        self._names = {id(m): n for n, m in model.named_modules()}
        self._modules = ModuleStack()
        self._fn = _FunctionName() if attribute else None
        self._exit = contextlib.ExitStack()

    # -- context -----------------------------------------------------------
    def _where(self) -> Tuple[str, str, str]:
        if not self.attribute:
            return '', '', ''
        module = self._modules.current
        name = self._names.get(id(module), '?') if module is not None \
            else '(outside modules)'
        mtype = type(module).__name__ if module is not None else ''
        fn = self._fn.current or '(autograd.Function)'
        return name or '(model)', mtype, fn

    def _pack(self, t: torch.Tensor):
        packed = _Packed(t.detach())
        name, mtype, fn = self._where()
        self._records.append(
            _Record(_storage_key(t), _tensor_bytes(t), name, mtype, fn,
                    ref=weakref.ref(packed), keep=packed.tensor))
        return packed

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def _region_pack(self, frame, t: torch.Tensor) -> None:
        region = self._regions.setdefault(id(frame), len(self._regions))
        name, mtype, fn = self._where()
        self._records.append(
            _Record(_storage_key(t), _tensor_bytes(t), name, mtype, fn,
                    keep=t.detach(), region=region))

    def __enter__(self) -> 'SavedTensorRecorder':
        if self.attribute:
            self._exit.enter_context(self._modules)
            self._exit.enter_context(self._fn)
        self._exit.enter_context(region_packs(self._region_pack))
        self._exit.enter_context(
            torch.autograd.graph.saved_tensors_hooks(self._pack,
                                                     self._unpack))
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()
        if exc[0] is None:
            self.result = self._summarise()
        self._records = []

    # -- counting ------------------------------------------------------------
    def _summarise(self) -> SavedAccount:
        excluded = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            key = _storage_key(t)
            if key is not None:
                excluded.add(key)
        account = SavedAccount()
        seen = set()
        entries = []
        for rec in self._records:
            if rec.region >= 0 or rec.ref() is None or rec.nbytes == 0:
                # region tensor, freed with its graph node, or empty (torch
                # 2.1's checkpoint saves an empty placeholder per region,
                # which a fake tensor shows without a storage key)
                continue
            if rec.key is not None:
                if rec.key in excluded or rec.key in seen or rec.key[1] == 0:
                    continue
                seen.add(rec.key)
            account.saved += rec.nbytes
            entries.append(rec)
        account.saved_entries = _entries(entries)
        per_region: Dict[int, List[_Record]] = defaultdict(list)
        for rec in self._records:
            if rec.region < 0:
                continue
            per_region[rec.region].append(rec)
        account.regions = len(per_region)
        best: List[_Record] = []
        best_bytes = 0
        for recs in per_region.values():
            region_seen = set()
            kept = []
            for rec in recs:
                if rec.nbytes == 0:
                    continue
                if rec.key is not None:
                    if rec.key in excluded or rec.key in seen \
                            or rec.key in region_seen or rec.key[1] == 0:
                        continue
                    region_seen.add(rec.key)
                kept.append(rec)
            nbytes = sum(r.nbytes for r in kept)
            if nbytes > best_bytes:
                best_bytes, best = nbytes, kept
        account.recompute = best_bytes
        account.recompute_entries = _entries(best)
        return account


def _entries(records: Sequence[_Record]) -> List[dict]:
    return [
        dict(module=r.module, type=r.module_type, fn=r.fn, bytes=r.nbytes)
        for r in records
    ]


_INDEX = re.compile(r'\.\d+(?=\.|$)')


def module_pattern(name: str) -> str:
    """``backbone.vit.blocks.3.mlp.act`` -> ``backbone.vit.blocks.*.mlp.act``.
    """
    return _INDEX.sub('.*', name)


def breakdown(entries: Sequence[dict], top: Optional[int] = None,
              by: str = 'pattern') -> List[dict]:
    """Aggregate saved-tensor entries.

    Args:
        entries: ``saved_entries``/``recompute_entries`` of an account.
        top (int, optional): Keep the largest ``top`` groups.
        by (str): ``'pattern'`` (module pattern, module type, function),
            ``'part'`` (top-level module: backbone, neck, decode_head, ...)
            or ``'fn'`` (torch function).

    Returns:
        list[dict]: ``{'where', 'type', 'fn', 'count', 'bytes'}``, largest
        first.
    """
    groups: Dict[tuple, dict] = {}
    for e in entries:
        if by == 'part':
            key = (e['module'].split('.', 1)[0], '', '')
        elif by == 'fn':
            key = ('', '', e['fn'])
        else:
            key = (module_pattern(e['module']), e['type'], e['fn'])
        g = groups.setdefault(
            key, dict(where=key[0], type=key[1], fn=key[2], count=0,
                      bytes=0))
        g['count'] += 1
        g['bytes'] += e['bytes']
    out = sorted(groups.values(), key=lambda g: -g['bytes'])
    return out[:top] if top else out


# ----------------------------------------------------------------------
def account_step(trainee, warmup: bool = False, attribute: bool = True,
                 top: int = 12) -> dict:
    """The exact memory account of one training step of a
    :class:`~apla_mm.benchmark.trainee.Trainee` (see the module docstring).

    By default the counted step is the model's first: every method starts
    from the same initial weights, so data-dependent parts (e.g. the RoIs a
    detector samples) are the same for all; the optimizer state is counted
    after this step's ``optimizer.step()`` created it. ``warmup=True`` runs
    one training step first.

    Returns:
        dict: bytes per component, ``total``, the breakdown of ``saved``
        per module pattern (``saved_top``), per top-level part
        (``saved_by_part``) and of the largest recomputed region
        (``recompute_top``).
    """
    if warmup:
        trainee.train_step()
    trainee.zero_grad()
    model = trainee.model
    weights = weight_bytes(model)
    substituted = len(trainee.substitutions)
    with trainee.compute():
        with SavedTensorRecorder(model, attribute=attribute) as rec:
            loss = trainee.forward_loss()
        account = rec.result
        trainee.backward(loss)
        del loss
    grads = grad_bytes(model)
    trainee.optimizer_step()
    optim = optimizer_bytes(trainee.optimizer)
    trainee.zero_grad()
    total = weights + grads + optim + account.saved + account.recompute
    subs = trainee.substitutions[substituted:]
    return dict(
        abstract=trainee.abstract,
        precision=trainee.amp or 'fp32',
        sdpa=trainee.sdpa,
        substitutions=_count_substitutions(subs),
        weights=weights,
        grads=grads,
        optimizer=optim,
        saved=account.saved,
        recompute=account.recompute,
        checkpointed_regions=account.regions,
        total=total,
        saved_by_part=breakdown(account.saved_entries, by='part'),
        saved_top=breakdown(account.saved_entries, top=top),
        recompute_top=breakdown(account.recompute_entries, top=top))


def _count_substitutions(subs: Sequence[dict]) -> List[dict]:
    groups: Dict[tuple, dict] = {}
    for s in subs:
        key = (s['op'], module_pattern(s['where']), s['assumption'])
        g = groups.setdefault(key, dict(op=key[0], where=key[1],
                                        assumption=key[2], count=0))
        g['count'] += 1
    return list(groups.values())
