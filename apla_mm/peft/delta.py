"""Small "delta" files: only what a PEFT run trained, and merging them back.

A checkpoint of an APLA run is a full model. Everything in its frozen modules
(the backbone) is bit-identical to the base model except the selected rows of
W_O, so the run is fully described by those rows plus the modules that
trained (neck, heads: parameters *and* buffers such as BatchNorm
statistics). :func:`export_delta` keeps exactly that; :func:`merge_delta`
writes it back into a full state dict of the base model. LoRA runs are
handled alike: the delta holds the factors ``A``, ``B``, and merging adds
``alpha / r * B @ A`` to the base weights.

Nothing here depends on the method: what a delta holds and how it merges
comes from the method's adapter class (:func:`~apla_mm.peft.base.
adapter_class` of ``meta['method']``: ``delta_entries``, ``new_entries``,
``base_entries``, ``merge_delta_``).

The delta also stores a fingerprint of everything it does *not* contain, as
found in the trained checkpoint. Merging checks that the base model has the
same fingerprint, so a delta cannot silently be applied to other pretrained
weights than the ones it was trained from.
"""
import hashlib
from typing import Iterable, List, Optional

import torch

from apla_mm.version import __version__
from .base import META_KEY, StateDict, adapter_class

DELTA_FORMAT = 1


class DeltaMismatchError(ValueError):
    """The base model does not match the weights a delta was trained on."""


def _in_modules(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def _row_mask(out_features: int, index: Optional[List[int]]) -> torch.Tensor:
    """True for rows the delta replaces (all rows for ``None``)."""
    mask = torch.zeros(out_features, dtype=torch.bool)
    if index is None:
        mask[:] = True
    else:
        mask[torch.as_tensor(index, dtype=torch.long)] = True
    return mask


def base_fingerprint(state_dict: StateDict, meta: dict) -> str:
    """SHA-256 of every frozen entry the delta does not replace.

    Covers all tensors under ``meta['frozen_modules']`` byte for byte,
    excluding the method's new entries (LoRA's factors) and the trained rows
    of its delta entries (APLA's rows of W_O).
    """
    method = adapter_class(meta.get('method'))
    replaced = method.delta_entries(meta)
    new = set(method.new_entries(meta))
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if not _in_modules(key, meta['frozen_modules']) or key in new:
            continue
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu()
        if key in replaced:
            value = value[~_row_mask(value.shape[0], replaced[key])]
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(str(value.dtype).encode())
        digest.update(value.contiguous().reshape(-1).view(
            torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_meta(checkpoint: dict) -> dict:
    """The ``meta['apla_mm']`` record of a checkpoint, with a clear error."""
    meta = checkpoint.get('meta', {}).get(META_KEY) if isinstance(
        checkpoint, dict) else None
    if meta is None:
        raise ValueError(
            'This checkpoint has no meta["apla_mm"]: it was not written by an '
            'apla_mm PEFT run (APLAHook/LoRAHook), so there is no trained '
            'subset to export.')
    return meta


def _index(rows: List[int]) -> torch.Tensor:
    return torch.as_tensor(rows, dtype=torch.long)


def export_delta(checkpoint: dict) -> dict:
    """Extract the trained tensors of a PEFT checkpoint (APLA, LoRA).

    Args:
        checkpoint (dict): An mmengine checkpoint (``meta``, ``state_dict``)
            saved by a run with :class:`~apla_mm.engine.APLAHook` or
            :class:`~apla_mm.engine.LoRAHook`.

    Returns:
        dict: ``{'meta': ..., 'state_dict': ...}`` where the state dict holds
        the method's trained entries inside the frozen modules (APLA: the
        selected rows of every adapted weight/bias, ``r x in`` and ``r``,
        full tensors for ``rank='full'``, under the original key; LoRA: the
        factors) and every entry outside the frozen modules.
    """
    if isinstance(checkpoint, dict) and 'base_fingerprint' in checkpoint.get(
            'meta', {}):
        raise ValueError(
            'This file is already a delta (written by export_delta, '
            f"format {checkpoint['meta'].get('format')}): there is nothing "
            'to export. Merge it into its base model with tools/'
            'merge_delta.py DELTA --base BASE.pth (or --config CFG) --out '
            'merged.pth, or export from the full checkpoint of the run '
            '(work_dirs/<run>/iter_N.pth).')
    meta = read_meta(checkpoint)
    try:
        method = adapter_class(meta.get('method'))
    except ValueError as e:
        raise ValueError(f'export_delta handles the PEFT methods\' '
                         f'checkpoints: {e}') from e
    state = checkpoint['state_dict']
    replaced = method.delta_entries(meta)
    new = set(method.new_entries(meta))
    delta: StateDict = {}
    for key, value in state.items():
        if key in replaced:
            rows = replaced[key]
            delta[key] = (value.clone() if rows is None else
                          value.index_select(0, _index(rows)))
        elif key in new or not _in_modules(key, meta['frozen_modules']):
            delta[key] = value.clone()
    missing = [k for k in list(replaced) + sorted(new) if k not in state]
    if missing:
        raise KeyError(f'checkpoint lacks adapted entries {missing[:3]}')
    return dict(
        meta=dict(
            format=DELTA_FORMAT,
            apla_mm_version=__version__,
            base_fingerprint=base_fingerprint(state, meta),
            **{META_KEY: meta}),
        state_dict=delta)


def merge_delta(base_state: StateDict,
                delta: dict,
                check_fingerprint: bool = True) -> StateDict:
    """Write a delta back into a full state dict of the base model.

    Args:
        base_state (dict): State dict of the base model (the pretrained
            backbone the delta was trained from; neck/head entries may be
            anything, they are replaced).
        delta (dict): Output of :func:`export_delta`.
        check_fingerprint (bool): Refuse a base whose frozen weights differ
            from those the delta was trained with. Defaults to True.

    Returns:
        dict: A new state dict equal to the trained model's.
    """
    if delta.get('meta', {}).get('format') != DELTA_FORMAT:
        raise ValueError('not an apla_mm delta file (missing meta.format='
                         f'{DELTA_FORMAT}); create one with '
                         'tools/export_delta.py')
    meta = delta['meta'][META_KEY]
    method = adapter_class(meta.get('method'))
    missing = [k for k in method.base_entries(meta) if k not in base_state]
    if missing:
        raise DeltaMismatchError(
            f'the base model has no {missing[0]!r} (and {len(missing) - 1} '
            'more adapted entries); is it the model the delta was trained on?')
    if check_fingerprint:
        found = base_fingerprint(base_state, meta)
        if found != delta['meta']['base_fingerprint']:
            raise DeltaMismatchError(
                'The base model\'s frozen weights differ from those the delta '
                'was trained with (fingerprint mismatch). Merge into the same '
                'pretrained weights (the model as initialised for training), '
                'or pass check_fingerprint=False / --no-check if you know '
                'what you are doing.')
    replaced = method.delta_entries(meta)
    new = set(method.new_entries(meta))
    merged = {k: v.clone() for k, v in base_state.items() if k not in new}
    method.merge_delta_(merged, delta['state_dict'], meta)
    for key, value in delta['state_dict'].items():
        if key in new:
            continue
        rows = replaced.get(key)
        if rows is None:
            merged[key] = value.clone()
        else:
            target = merged[key]
            merged[key] = target.index_copy(0, _index(rows),
                                            value.to(target.dtype))
    return merged
