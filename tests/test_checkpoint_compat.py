"""mmengine checkpoints load weights-only: with torch's default unpickler
on torch >= 2.6 (what mmengine's own loader then uses), and through
:func:`apla_mm.compat.load_weights_only` on every supported torch."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub

import apla_mm  # noqa: F401  (registers the allowlist)
from apla_mm.compat import HAS_SAFE_GLOBALS, TORCH_VERSION, load_weights_only
from apla_mm.utils.checkpoint_compat import (history_buffer_getattr,
                                             register_checkpoint_safe_globals)


def _mmengine_like_checkpoint():
    hub = MessageHub.get_instance('apla_mm_compat_test')
    for i in range(3):
        hub.update_scalar('train/loss', float(i))
        hub.update_scalar('train/np', np.float64(i) / 3)
    hub.update_info('iter', 3)
    return dict(
        meta=dict(epoch=1, iter=3, seed=np.int64(0), arr=np.arange(4)),
        state_dict={'w': torch.ones(2)},
        message_hub=hub.state_dict())


def _loaders():
    """Each weights-only loader the running torch has."""
    loaders = [load_weights_only]
    if TORCH_VERSION >= (2, 6):  # weights_only=True is torch's default
        loaders.append(torch.load)
    return loaders


def test_allowlist_registered_where_torch_has_one():
    assert register_checkpoint_safe_globals() == HAS_SAFE_GLOBALS


@pytest.mark.parametrize('load', _loaders(), ids=lambda f: f.__name__)
def test_message_hub_checkpoint_loads_weights_only(tmp_path, load):
    path = tmp_path / 'ckpt.pth'
    torch.save(_mmengine_like_checkpoint(), path)
    loaded = load(path)
    buffers = loaded['message_hub']['log_scalars']
    assert isinstance(buffers['train/loss'], HistoryBuffer)
    assert buffers['train/loss'].mean() == pytest.approx(1.0)
    assert loaded['meta']['arr'].tolist() == [0, 1, 2, 3]


class _Evil:

    def __reduce__(self):
        return getattr, (np.ndarray, 'fill')


@pytest.mark.parametrize('load', _loaders(), ids=lambda f: f.__name__)
def test_other_getattr_calls_are_still_refused(tmp_path, load):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        load(path)
    with pytest.raises(pickle.UnpicklingError):
        history_buffer_getattr(np, 'load')
    assert history_buffer_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean


@pytest.mark.parametrize('load', _loaders(), ids=lambda f: f.__name__)
def test_arbitrary_globals_are_still_refused(tmp_path, load):
    path = tmp_path / 'evil2.pth'
    torch.save({'f': np.load}, path)
    with pytest.raises(pickle.UnpicklingError):
        load(path)
