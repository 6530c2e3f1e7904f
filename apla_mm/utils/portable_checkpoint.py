"""Checkpoints that stock tools open without apla_mm and without disabling
torch's weights-only safety check.

A checkpoint written by mmengine's Runner holds, besides the state dict, the
optimizer state, the ``message_hub`` (mmengine ``HistoryBuffer`` objects) and
a ``meta`` dict that may hold numpy scalars. torch >= 2.6 loads with
``weights_only=True`` by default and refuses those objects unless someone
allow-lists them, which importing apla_mm does
(:mod:`apla_mm.utils.checkpoint_compat`) but mmseg's and mmdet's own
``tools/test.py`` with a base config do not. :func:`portable_checkpoint`
keeps what inference needs: the ``state_dict`` (APLA checkpoints already hold
the plain model's keys and merged weights) and a ``meta`` reduced to plain
Python values (``dataset_meta``, ``apla_mm``, iteration, config text), which
torch's weights-only unpickler reads as it is. ``tools/publish_checkpoint.py``
is the command line for it.
"""
import os
import os.path as osp
from typing import Any, Optional

import torch

from apla_mm.compat import load_weights_only

_PLAIN = (str, int, float, bool, type(None))


def plain_value(value: Any) -> Any:
    """``value`` as plain Python (numbers, strings, lists, dicts, tensors);
    numpy arrays and scalars become lists and numbers; anything else (e.g.
    a class or a HistoryBuffer) becomes its ``repr`` string."""
    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    try:
        import numpy as np
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
    except ImportError:  # pragma: no cover - numpy is a torch dependency
        pass
    return repr(value)


def portable_checkpoint(checkpoint: dict) -> dict:
    """The inference part of an mmengine checkpoint, in plain types.

    Args:
        checkpoint (dict): As loaded from an ``iter_N.pth``/``epoch_N.pth``
            (with ``state_dict``), or a bare state dict.

    Returns:
        dict: ``{'state_dict': ..., 'meta': ...}`` that ``torch.load(...,
        weights_only=True)`` reads without any allow-listed class.
    """
    if 'state_dict' in checkpoint:
        state_dict = checkpoint['state_dict']
    elif checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint
    else:
        raise ValueError(
            'Not a model checkpoint: it has no `state_dict` (keys '
            f'{sorted(checkpoint)[:6]}). Give the iter_N.pth/epoch_N.pth that '
            'training wrote.')
    out = dict(state_dict={k: v.detach().cpu()
                           for k, v in state_dict.items()})
    meta = checkpoint.get('meta') if 'state_dict' in checkpoint else None
    if meta:
        out['meta'] = plain_value(meta)
    return out


def publish_checkpoint(src: str, dst: str,
                       overwrite: bool = False) -> Optional[dict]:
    """Write :func:`portable_checkpoint` of the file ``src`` to ``dst``.

    Refuses to overwrite an existing ``dst`` (unless ``overwrite``) and to
    write onto ``src`` itself, so no checkpoint is ever lost.

    Returns:
        dict: The ``meta`` written (or None).
    """
    if not osp.isfile(src):
        raise FileNotFoundError(f'checkpoint {src!r} does not exist')
    if osp.exists(dst) and osp.samefile(src, dst):
        raise ValueError(f'--out {dst!r} is the input checkpoint itself; '
                         'choose another file name.')
    if osp.exists(dst) and not overwrite:
        raise FileExistsError(
            f'{dst!r} exists; choose another file name or pass --overwrite.')
    checkpoint = load_weights_only(src)
    portable = portable_checkpoint(checkpoint)
    folder = osp.dirname(osp.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    tmp = dst + '.tmp'
    torch.save(portable, tmp)
    os.replace(tmp, dst)
    return portable.get('meta')
