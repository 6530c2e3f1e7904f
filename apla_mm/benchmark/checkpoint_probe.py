"""What an activation-checkpointed region would have saved: a probe into
torch's private checkpoint machinery.

Private torch API touched
-------------------------
``torch.utils.checkpoint._checkpoint_hook``: the
``torch.autograd.graph.saved_tensors_hooks`` subclass that non-reentrant
checkpointing (``checkpoint(..., use_reentrant=False)``, what timm's
``set_grad_checkpointing`` and apla_mm's ``with_cp`` use) installs around a
region's forward pass, with ``__init__(self, frame)`` setting
``self.pack_hook``. Its pack hook sees every tensor the region's operators
save for backward and replaces it with a small holder (the tensor is
recomputed in backward instead).

Why
---
The exact memory account (:mod:`.account`) has to know what a
checkpointed region drops and recomputes: public hooks around the region
only see its inputs, and an outer ``saved_tensors_hooks`` is shadowed by
the checkpoint's own while the region runs. :func:`region_packs` swaps the
class for a subclass whose pack hook reports each tensor before calling
the original one, so checkpointing itself behaves exactly as before, and
puts the original back on exit.

Checked on
----------
torch 2.13.0, the version apla_mm pins (the class, its ``frame`` argument
and its ``pack_hook`` attribute); other versions are not checked here. On a
torch without ``_checkpoint_hook`` the probe does nothing and the account's
``recompute`` is 0 (:data:`AVAILABLE` says which).
"""
import contextlib
from typing import Callable, Iterator

import torch
import torch.utils.checkpoint as _cp

#: Whether this torch has the private class the probe wraps.
AVAILABLE = hasattr(_cp, '_checkpoint_hook')

#: ``callback(frame, tensor)``: ``frame`` identifies the checkpointed
#: region (one object per region call), ``tensor`` is what it saves.
RegionPackCallback = Callable[[object, torch.Tensor], None]


@contextlib.contextmanager
def region_packs(callback: RegionPackCallback) -> Iterator[bool]:
    """Report every tensor a non-reentrant checkpointed region saves.

    Args:
        callback (RegionPackCallback): Called with ``(frame, tensor)`` for
            each tensor, in the region's forward pass, before the checkpoint
            replaces it with its holder.

    Yields:
        bool: Whether the probe is active (:data:`AVAILABLE`).
    """
    original = getattr(_cp, '_checkpoint_hook', None)
    if original is None:  # pragma: no cover - other torch versions
        yield False
        return

    class _ReportingCheckpointHook(original):

        def __init__(self, frame) -> None:
            super().__init__(frame)
            inner = self.pack_hook

            def pack_hook(x):
                callback(frame, x)
                return inner(x)

            self.pack_hook = pack_hook

    _cp._checkpoint_hook = _ReportingCheckpointHook
    try:
        yield True
    finally:
        _cp._checkpoint_hook = original


__all__ = ['AVAILABLE', 'RegionPackCallback', 'region_packs']
