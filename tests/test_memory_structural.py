"""Lean loss, head checkpointing and fused attention (apla_mm.memory):
same losses and gradients as stock mmseg, less saved for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import config_path

pytest.importorskip('mmseg')


def _build(num_classes=5, decode_loss=None, align_corners=False):
    """Tiny mmseg UperNet ViT (configs/_base_/models/upernet_vit-tiny_mln.py)
    with BatchNorm instead of SyncBN (one process)."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(
        config_path('_base_', 'models', 'upernet_vit-tiny_mln.py'))
    for head in ('decode_head', 'auxiliary_head'):
        cfg.model[head].norm_cfg = dict(type='BN', requires_grad=True)
        cfg.model[head].num_classes = num_classes
        cfg.model[head].align_corners = align_corners
    if decode_loss is not None:
        cfg.model.decode_head.loss_decode = decode_loss
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.train()


def _batch(num_classes=5, size=64, seed=0):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    samples = []
    for i in range(2):
        lbl = torch.randint(0, num_classes, (1, size, size), generator=g)
        lbl[:, :7] = 255  # ignored pixels
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lbl)
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                            pad_shape=(size, size)))
        samples.append(s)
    return x, samples


def _saved_bytes(model, fn):
    """Run ``fn`` recording the tensors saved for backward: unique bytes of
    their storages (parameters and buffers excluded), and their shapes."""
    own = {t.untyped_storage().data_ptr()
           for t in list(model.parameters()) + list(model.buffers())}
    seen, shapes = {}, []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own and s.data_ptr() != 0:
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), shapes, out


def _step(model, x, samples, count=False):
    """Losses, gradients (by name) and saved bytes of one training step."""
    torch.manual_seed(1)  # dropout
    model.zero_grad(set_to_none=True)
    saved, shapes, losses = _saved_bytes(model, lambda: model.loss(x, samples))
    loss = sum(v for k, v in losses.items() if 'loss' in k)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return ({k: v.detach().clone() for k, v in losses.items()}, grads,
            saved, shapes)


def _assert_same(ref, out, rtol=1e-4):
    ref_losses, ref_grads = ref[0], ref[1]
    losses, grads = out[0], out[1]
    assert losses.keys() == ref_losses.keys()
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=rtol,
                                   atol=1e-5, msg=k)
    assert grads.keys() == ref_grads.keys()
    # a tolerance relative to each tensor's own scale, with a floor at the
    # model's gradient scale (biases before a BatchNorm have exactly-zero
    # true gradients: noise at 1e-11)
    scale = max(g.abs().max() for g in ref_grads.values())
    for k in ref_grads:
        err = (grads[k] - ref_grads[k]).abs().max()
        tol = rtol * max(ref_grads[k].abs().max(), 1e-3 * scale) + 1e-8
        assert err <= tol, (k, float(err), float(tol))


# ----------------------------------------------------------------------
@pytest.mark.parametrize('n_in,n_out', [(16, 64), (8, 64), (13, 50),
                                        (64, 64), (32, 17)])
@pytest.mark.parametrize('align_corners', [False, True])
def test_interpolation_matrix_is_f_interpolate(n_in, n_out, align_corners):
    from apla_mm.memory.lean_loss import interpolation_matrix
    x = torch.randn(2, 3, n_in, n_in + 3)
    ref = F.interpolate(x, size=(n_out, n_out + 5), mode='bilinear',
                        align_corners=align_corners)
    a_h = interpolation_matrix(n_in, n_out, align_corners)
    a_w = interpolation_matrix(n_in + 3, n_out + 5, align_corners)
    # PyTorch computes the source coordinates in float32, we in float64
    torch.testing.assert_close(a_h @ x @ a_w.t(), ref, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize('chunk_mb', [32.0, 0.01])  # one band / many bands
def test_lean_loss_same_loss_gradients_and_accuracy(chunk_mb):
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    x, samples = _batch()
    lean = copy.deepcopy(model)
    ref = _step(model, x, samples)
    handle = apply_memory_options(
        lean, MemoryConfig(lean_loss=True, lean_loss_chunk_mb=chunk_mb))
    assert handle.lean_heads == {'decode_head': True,
                                 'auxiliary_head': True}
    out = _step(lean, x, samples)
    _assert_same(ref, out)
    # the full-resolution logits (B x C x 64 x 64) are never saved
    full = (2, 5, 64, 64)
    assert full in ref[3] and full not in out[3]
    assert out[2] < ref[2]


def test_lean_loss_saves_only_the_logits():
    """Per head: stock keeps full-resolution tensors, lean the logits."""
    from apla_mm.memory.lean_loss import _BandedUpsampledCE
    logits = torch.randn(2, 7, 16, 16, requires_grad=True)
    label = torch.randint(0, 7, (2, 64, 64))
    label[:, :3] = 255

    def stock():
        up = F.interpolate(logits, size=(64, 64), mode='bilinear')
        return F.cross_entropy(up, label, ignore_index=255,
                               reduction='sum')

    def lean():
        return _BandedUpsampledCE.apply(logits, label, False, 255, 4096)[0]

    holder = torch.nn.Linear(1, 1)
    s_bytes, _, s_loss = _saved_bytes(holder, stock)
    l_bytes, _, l_loss = _saved_bytes(holder, lean)
    torch.testing.assert_close(l_loss, s_loss, rtol=1e-5, atol=1e-4)
    logit_bytes = logits.numel() * 4
    label_bytes = label.numel() * 8
    assert l_bytes == logit_bytes + label_bytes
    # stock: the full-resolution log-softmax and the labels
    assert s_bytes >= 2 * 7 * 64 * 64 * 4 + label_bytes
    assert l_bytes < 0.3 * s_bytes
    g_stock, = torch.autograd.grad(stock(), logits)
    g_lean, = torch.autograd.grad(lean(), logits)
    torch.testing.assert_close(g_lean, g_stock, rtol=1e-4, atol=1e-6)


def test_lean_loss_variants_match_stock():
    """avg_non_ignore and two CE terms of one name (fast path), align_corners,
    and a loss the fast path does not cover (checkpointed original)."""
    from apla_mm.memory import MemoryConfig, apply_memory_options
    cases = [
        (dict(decode_loss=[
            dict(type='CrossEntropyLoss', loss_weight=1.0,
                 avg_non_ignore=True),
            dict(type='CrossEntropyLoss', loss_weight=0.5)
        ], align_corners=True), True),
        (dict(decode_loss=[
            dict(type='CrossEntropyLoss', loss_weight=1.0),
            dict(type='DiceLoss', loss_weight=0.3)
        ]), False),
    ]
    x, samples = _batch()
    for kwargs, fast in cases:
        model = _build(**kwargs)
        lean = copy.deepcopy(model)
        ref = _step(model, x, samples)
        handle = apply_memory_options(lean, MemoryConfig(lean_loss=True))
        assert handle.lean_heads['decode_head'] is fast
        out = _step(lean, x, samples)
        _assert_same(ref, out)
        assert out[2] < ref[2]


def test_checkpoint_heads_same_step_less_saved():
    """Gradients, losses (with dropout) and BatchNorm running statistics as
    without checkpointing; the neck/heads keep less for backward."""
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    x, samples = _batch()
    ckpt = copy.deepcopy(model)
    handle = apply_memory_options(ckpt, MemoryConfig(checkpoint_heads=True))
    assert 'decode_head' in handle.checkpointed  # UPerHead fusion region
    assert 'neck' in handle.checkpointed  # MultiLevelNeck levels
    assert any('auxiliary_head.convs' in n for n in handle.checkpointed)
    ref = _step(model, x, samples)
    out = _step(ckpt, x, samples)
    _assert_same(ref, out)
    stats = {n: b for n, b in model.named_buffers()}
    for n, b in ckpt.named_buffers():
        # UPerHead's fpn_bottleneck runs as a sum of per-level convolutions
        # (float summation order); every other statistic is bit for bit
        exact = 'fpn_bottleneck' not in n
        torch.testing.assert_close(b, stats[n], rtol=0 if exact else 1e-5,
                                   atol=0 if exact else 1e-6, msg=n)
    assert out[2] < 0.75 * ref[2], (out[2], ref[2])
    # eval: plain forward, same prediction
    model.eval()
    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ckpt.predict(x, samples)[0].seg_logits.data,
            model.predict(x, samples)[0].seg_logits.data)


def test_fused_attention_same_step_no_attention_matrix():
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    x, samples = _batch()
    fused = copy.deepcopy(model)
    handle = apply_memory_options(fused, MemoryConfig(fused_attention=True))
    assert len(handle.fused_mha) == 4
    ref = _step(model, x, samples)
    out = _step(fused, x, samples)
    _assert_same(ref, out)
    n = (64 // 8)**2 + 1  # tokens incl. the class token
    square = [s for s in ref[3] if len(s) >= 2 and s[-2:] == (n, n)]
    assert square, 'mmcv path should save the attention matrices'
    assert not [s for s in out[3] if len(s) >= 2 and s[-2:] == (n, n)]
    assert out[2] < ref[2]


def test_all_options_with_apla_and_lora_and_remove():
    """Every structural option on top of APLA and of LoRA: same gradients
    for the trained tensors; remove() restores the stock forward."""
    from apla_mm.memory import MemoryConfig, apply_memory_options
    from apla_mm.peft.apla import APLAAdapter, APLAConfig
    from apla_mm.peft.lora import LoRAAdapter, LoRAConfig
    x, samples = _batch()
    config = MemoryConfig(lean_loss=True, checkpoint_heads=True,
                          fused_attention=True)
    for make in (lambda m: APLAAdapter(m, APLAConfig(rank=16)),
                 lambda m: LoRAAdapter(m, LoRAConfig(rank=4))):
        model = _build()
        make(model)
        lean = copy.deepcopy(model)
        ref = _step(model, x, samples)
        handle = apply_memory_options(lean, config)  # after the adapter
        out = _step(lean, x, samples)
        _assert_same(ref, out)
        assert out[2] < 0.6 * ref[2]
        handle.remove()
        again = _step(lean, x, samples)
        # stock saving again (up to allocator reuse of the label storage)
        assert abs(again[2] - ref[2]) <= 0.01 * ref[2]
        _assert_same(ref, again)
        assert 'forward' not in lean.decode_head.__dict__
        assert 'loss_by_feat' not in lean.decode_head.__dict__


def test_errors_name_the_fix():
    from apla_mm.memory import MemoryConfig, apply_memory_options
    with pytest.raises(ValueError, match='frozen_dtype must be one of'):
        MemoryConfig(frozen_dtype='float8')
    with pytest.raises(TypeError, match='True or False'):
        MemoryConfig(lean_loss='yes')
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='lean_loss=False'):
        apply_memory_options(plain, MemoryConfig(lean_loss=True))
    with pytest.raises(ValueError, match='checkpoint_heads=False'):
        apply_memory_options(plain, MemoryConfig(checkpoint_heads=True))


def _widest_maps(fn, batch):
    """Run ``fn`` and return the largest channel count of any 4-d
    ``batch x C x H x W`` tensor an operator produced (forward, checkpoint
    recomputation and backward alike)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    widest = [0]

    class Record(TorchDispatchMode):

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out, )):
                if isinstance(t, torch.Tensor) and t.dim() == 4 \
                        and t.shape[0] == batch and t.shape[2] > 3:
                    widest[0] = max(widest[0], t.shape[1])
            return out

    with Record():
        fn()
    return widest[0]


@pytest.mark.parametrize('align_corners', [False, True])
def test_uper_fusion_split_matches_stock_and_never_builds_the_concat(
        align_corners):
    """UPerHead's fusion as a sum of per-level convolutions: outputs,
    gradients (inputs and parameters) and BatchNorm statistics as stock
    UPerHead; no 4 x channels map is built, saved or recomputed."""
    from mmseg.models.decode_heads import UPerHead
    from apla_mm.memory.checkpointing import enable_head_checkpointing
    torch.manual_seed(0)
    channels = 16
    stock = UPerHead(in_channels=[8, 8, 8, 8], channels=channels,
                     in_index=[0, 1, 2, 3], num_classes=5, dropout_ratio=0.1,
                     norm_cfg=dict(type='BN', requires_grad=True),
                     align_corners=align_corners).train()
    split = copy.deepcopy(stock)
    wrapper = torch.nn.Module()
    wrapper.decode_head = split
    names = enable_head_checkpointing(wrapper, parts=['decode_head'])
    assert 'decode_head' in names
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 8, s, s, generator=g) for s in (16, 8, 4, 2)]

    def run(head):
        xs = [x.clone().requires_grad_() for x in inputs]
        head.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # dropout masks
        out = head(xs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() \
            .backward()
        return out.detach(), [x.grad for x in xs], {
            n: p.grad for n, p in head.named_parameters()}

    ref = {}
    wide_stock = _widest_maps(lambda: ref.update(r=run(stock)), 2)
    got = {}
    wide_split = _widest_maps(lambda: got.update(r=run(split)), 2)
    (ref_out, ref_xg, ref_pg), (out, xg, pg) = ref['r'], got['r']
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for a, b in zip(xg, ref_xg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert pg.keys() == ref_pg.keys()
    for k in ref_pg:  # float summation order: relative to each tensor
        err = (pg[k] - ref_pg[k]).abs().max()
        assert err <= 1e-5 * ref_pg[k].abs().max() + 1e-7, (k, float(err))
    for (n, b), (_, r) in zip(split.named_buffers(), stock.named_buffers()):
        torch.testing.assert_close(b, r, rtol=1e-5, atol=1e-6, msg=n)
    # stock concatenates 4 x channels; the split never does (the PSP
    # concatenation, 8 + 4 x 16 channels at 2 x 2, is below the size filter)
    assert wide_stock == 4 * channels
    assert wide_split == channels, wide_split
    # under bf16 autocast: as stock AMP to bf16 precision
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ref_amp, got_amp = run(stock)[0], run(split)[0]
    torch.testing.assert_close(got_amp.float(), ref_amp.float(), rtol=2e-2,
                               atol=2e-2 * ref_amp.float().abs().max())
