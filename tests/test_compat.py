"""apla_mm.compat: each torch-version shim works on the running torch, and
its fallback (the path older torch takes) works here too.

CI runs this file on torch 2.1.2 and 2.13.0, so on each end one of the two
paths of every shim is the native one.
"""
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

from apla_mm import compat


class _OldTorchLinear(nn.Linear):
    """An ``nn.Linear`` without the public hook registrations (as on torch
    < 2.5), so the shims take their fallback on any torch."""
    register_state_dict_post_hook = None
    register_load_state_dict_pre_hook = None


@pytest.mark.parametrize('cls', [nn.Linear, _OldTorchLinear],
                         ids=['native', 'fallback'])
def test_state_dict_hooks_see_module_and_entries(cls):
    module = cls(3, 2)
    calls = []

    def drop_bias(mod, state_dict, prefix, local_metadata):
        calls.append(('save', mod, prefix))
        state_dict.pop(prefix + 'bias')

    def fill_bias(mod, state_dict, prefix, *args):
        calls.append(('load', mod, prefix, len(args)))
        state_dict.setdefault(prefix + 'bias', torch.full((2, ), 7.0))

    parent = nn.Sequential(module)
    save = compat.register_state_dict_post_hook(module, drop_bias)
    load = compat.register_load_state_dict_pre_hook(module, fill_bias)
    state = parent.state_dict()
    assert list(state) == ['0.weight']
    parent.load_state_dict(state)
    assert torch.equal(module.bias, torch.full((2, ), 7.0))
    # strict, missing_keys, unexpected_keys, error_msgs after local_metadata
    assert calls == [('save', module, '0.'), ('load', module, '0.', 5)]
    save.remove()
    load.remove()
    assert list(parent.state_dict()) == ['0.weight', '0.bias']


def test_disabled_grad_scaler_is_a_no_op_on_cpu():
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = compat.grad_scaler('cpu', enabled=False)
    loss = model(torch.ones(1, 2)).sum()
    assert scaler.scale(loss) is loss
    before = model.weight.detach().clone()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(before, model.weight)


def test_enabled_cpu_grad_scaler_needs_torch_2_3():
    if hasattr(torch.amp, 'GradScaler'):
        assert compat.grad_scaler('cpu').is_enabled()
    else:
        with pytest.raises(compat.TorchTooOld,
                           match=r'Loss scaling .* needs torch >= 2\.3'):
            compat.grad_scaler('cpu')


def _mmengine_like_checkpoint() -> bytes:
    from mmengine.logging import HistoryBuffer
    buffer = HistoryBuffer()
    buffer.update(0.5)
    checkpoint = dict(
        state_dict={'w': torch.arange(4, dtype=torch.bfloat16)},
        meta=dict(seed=np.int64(3), lr=np.float64(0.1),
                  arr=np.arange(3, dtype=np.uint8)),
        message_hub=dict(log_scalars={'loss': buffer}))
    out = io.BytesIO()
    torch.save(checkpoint, out)
    return out.getvalue()


class _Unexpected:
    pass


@pytest.mark.parametrize('native', [True, False],
                         ids=['native', 'restricted-unpickler'])
def test_weights_only_load_reads_mmengine_and_refuses_code(native,
                                                           monkeypatch):
    if not native:  # the torch < 2.4 path, taken on any torch
        monkeypatch.setattr(compat, 'HAS_SAFE_GLOBALS', False)
    elif not compat.HAS_SAFE_GLOBALS:
        pytest.skip('torch < 2.4 has no add_safe_globals')
    loaded = compat.load_weights_only(io.BytesIO(_mmengine_like_checkpoint()))
    assert torch.equal(loaded['state_dict']['w'],
                       torch.arange(4, dtype=torch.bfloat16))
    assert loaded['meta']['seed'] == 3
    assert loaded['message_hub']['log_scalars']['loss'].current() == 0.5

    out = io.BytesIO()
    torch.save({'x': _Unexpected()}, out)
    with pytest.raises(pickle.UnpicklingError, match='_Unexpected'):
        compat.load_weights_only(io.BytesIO(out.getvalue()))


def test_too_old_error_names_feature_version_and_fix():
    message = str(compat.TorchTooOld('Feature X', '9.9'))
    assert 'Feature X needs torch >= 9.9' in message
    assert torch.__version__ in message
    assert 'tools/install.sh' in message


def test_cpu_autocast_attention_backward_survives():
    """Without the guard, torch 2.1.2 aborts the process here
    (pytorch/pytorch#132871): 17 tokens, batch x heads > 1, bfloat16."""
    import torch.nn.functional as F
    q, k, v = (torch.randn(2, 3, 17, 64, requires_grad=True)
               for _ in range(3))
    with torch.autocast('cpu', dtype=torch.bfloat16), \
            compat.cpu_autocast_attention_guard('cpu', torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all()
               for t in (q, k, v))
    for device, dtype in (('cuda', torch.bfloat16), ('cpu', None),
                          ('cpu', torch.float32)):
        guard = compat.cpu_autocast_attention_guard(device, dtype)
        assert type(guard).__name__ == 'nullcontext'
