"""Frozen weights in bf16 with fp32 masters (apla_mm.memory.low_precision)
and the MemoryEfficientHook's checks."""
import copy
import types

import pytest
import torch

from test_memory_structural import _batch, _build

pytest.importorskip('mmseg')

BF16 = torch.bfloat16


def _amp_step(model, x, samples, optimizer=None):
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=BF16):
        losses = model.loss(x, samples)
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    if optimizer is not None:
        optimizer.step()
    return float(loss), grads


def _apla(model):
    from apla_mm.peft.apla import APLAAdapter, APLAConfig
    adapter = APLAAdapter(model, APLAConfig(rank=16))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                          lr=0.5)
    adapter.attach_optimizer(opt)
    return adapter, opt


def test_bf16_frozen_weights_train_as_stock_amp_and_save_fp32():
    from apla_mm.memory import MemoryConfig, apply_memory_options
    from apla_mm.peft.delta import export_delta, merge_delta
    x, samples = _batch()
    base = _build()
    pretrained = copy.deepcopy(base.state_dict())
    stock, lean = copy.deepcopy(base), copy.deepcopy(base)
    ad_s, opt_s = _apla(stock)
    ad_l, opt_l = _apla(lean)
    handle = apply_memory_options(lean, MemoryConfig(frozen_dtype='bfloat16'))
    lp = handle.cast_frozen_()
    wo = 'backbone.layers.0.attn.attn.out_proj.weight'
    qkv = 'backbone.layers.0.attn.attn.in_proj_weight'
    params = dict(lean.named_parameters())
    assert params[qkv].dtype == BF16 and params[wo].dtype == BF16
    # trainable tensors, norms and embeddings stay float32
    for n, p in lean.named_parameters():
        if p.requires_grad or 'ln' in n or 'norm' in n or 'pos_embed' in n:
            assert p.dtype == torch.float32, n
    assert lp.num_bytes_saved() > 0
    # two AMP steps: the same losses and gradients as stock AMP
    for _ in range(2):
        ref_loss, ref_grads = _amp_step(stock, x, samples, opt_s)
        loss, grads = _amp_step(lean, x, samples, opt_l)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4,
                                       atol=1e-6, msg=k)
    # state_dict: the base's fp32 frozen weights bit for bit, W_O with the
    # fp32 trained rows, like the stock-AMP-trained model's
    state = lean.state_dict()
    stock_state = stock.state_dict()
    assert state.keys() == stock_state.keys()
    index = ad_l.layers[0].index
    for k, v in state.items():
        assert v.dtype == pretrained[k].dtype, k
        if k.startswith('backbone.') and 'out_proj' not in k:
            assert torch.equal(v, pretrained[k]), k
    rows = lean.backbone.layers[0].attn.attn.out_proj.apla_weight
    assert torch.equal(state[wo][index], rows.detach())
    assert not torch.equal(state[wo][index], pretrained[wo][index])
    mask = torch.ones(state[wo].shape[0], dtype=torch.bool)
    mask[index] = False
    assert torch.equal(state[wo][mask], pretrained[wo][mask])
    for k in state:
        torch.testing.assert_close(state[k], stock_state[k], rtol=1e-4,
                                   atol=1e-6, msg=k)
    # delta -> merge into the fp32 base -> a plain fp32 model
    ckpt = dict(state_dict=state, meta=dict(apla_mm=ad_l.meta()))
    merged_state = merge_delta(pretrained, export_delta(ckpt))
    merged = _build()
    merged.load_state_dict(merged_state)
    merged.eval()
    lean.eval()
    with torch.no_grad():
        out32 = merged.predict(x, samples)[0].seg_logits.data
        with torch.autocast('cpu', dtype=BF16):
            out_amp = lean.predict(x, samples)[0].seg_logits.data.float()
    # the fp32 merged model vs the trained model under AMP: bf16 precision
    err = (out32 - out_amp).abs().max() / out32.abs().max()
    assert err < 3e-2, float(err)
    # restore: fp32 weights in the model, equal to the saved state
    handle.restore_frozen_()
    assert dict(lean.named_parameters())[qkv].dtype == torch.float32
    for k, v in lean.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        torch.testing.assert_close(
            lean.predict(x, samples)[0].seg_logits.data, out32)
    handle.remove()


def test_load_state_dict_updates_masters():
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    model.backbone.requires_grad_(False)  # frozen-backbone baseline
    other = _build()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    handle = apply_memory_options(model, MemoryConfig(frozen_dtype='float16'))
    handle.cast_frozen_()
    model.load_state_dict(other.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    handle.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k


def test_hook_requires_amp_of_the_same_dtype():
    from mmengine.optim import OptimWrapper

    from apla_mm.engine.hooks import MemoryEfficientHook
    from apla_mm.engine.optim_wrappers.amp import PortableAmpOptimWrapper
    model = _build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = types.SimpleNamespace(model=model,
                                   optim_wrapper=OptimWrapper(opt))
    hook = MemoryEfficientHook(frozen_dtype='bfloat16', lean_loss=True)
    with pytest.raises(ValueError, match='--amp'):
        hook.before_run(runner)
    if not torch.cuda.is_available():
        runner.optim_wrapper = PortableAmpOptimWrapper(optimizer=opt)
        with pytest.raises(ValueError, match="frozen_dtype='bfloat16'"):
            MemoryEfficientHook(frozen_dtype='float16').before_run(runner)
        hook.before_run(runner)  # bf16 autocast on a CPU: accepted
        assert hook.handle.lean_heads
        model.backbone.requires_grad_(False)
        hook.before_train(runner)
        assert hook.handle.frozen_cast
        hook.before_val_epoch(runner)
        assert not hook.handle.frozen_cast
        hook.after_val_epoch(runner)
        assert hook.handle.frozen_cast
        hook.after_train(runner)
        assert not hook.handle.frozen_cast


def test_toy_run_with_every_option(toy_seg_root, tmp_path):
    """APLAHook + MemoryEfficientHook (all options, bf16 AMP) through the
    Runner: the frozen entries of the saved checkpoint are the initial fp32
    weights, and the model has fp32 weights again after training."""
    from apla_mm.engine.hooks import MemoryEfficientHook
    from apla_mm.testing import ParamSnapshotHook, build_runner, short_run_cfg
    if torch.cuda.is_available():
        pytest.skip('CPU bf16 autocast run')
    cfg = short_run_cfg(
        'apla/apla-r16-lean_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        str(tmp_path), toy_seg_root, max_iters=2, batch_size=2,
        checkpoint_interval=2)
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    hook = next(h for h in runner.hooks
                if isinstance(h, MemoryEfficientHook))
    assert hook.handle.low_precision is not None
    assert not hook.handle.frozen_cast  # restored after training
    assert all(p.dtype == torch.float32 for p in runner.model.parameters())
    state = torch.load(str(tmp_path / 'iter_2.pth'), map_location='cpu',
                       weights_only=False)['state_dict']
    for key, before in snapshot.before.items():
        if key.startswith('backbone.') and 'out_proj' not in key:
            assert state[key].dtype == torch.float32, key
            assert torch.equal(state[key], before), key
