"""META-style adapter (METAAdapterViT) and its layers, on tiny models."""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from apla_mm.models import METAAdapterViT
from apla_mm.models.meta_adapter import (CascadedMEA, CrossShapedAttention,
                                         MEABlock, cross_shaped_attention,
                                         even_interaction_indexes)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_CONFIG = ('meta_adapter/'
              'meta-adapter_upernet_timm-vit-tiny_1xb8-600it_toyseg-64x64.py')
ADE_CONFIG = ('meta_adapter/'
              'meta-adapter_upernet_timm-vit-b16_8xb2-160k_ade20k-512x512.py')
DET_TOY_CONFIG = ('meta_adapter/meta-adapter_mask-rcnn_timm-vit-tiny_fpn_'
                  '1xb8-200it_toycoco-128x128.py')
DET_COCO_CONFIG = (
    'meta_adapter/'
    'meta-adapter_mask-rcnn_timm-vit-b16_fpn_8xb2-lsj-1x_coco.py')


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """These tensors are tiny: one thread is as fast on an idle machine and
    up to 10x faster on a busy shared one (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_meta(patch=8, dim=32, depth=4, **kwargs):
    torch.manual_seed(0)
    cfg = dict(
        num_interactions=2,
        num_cascades=2,
        num_heads=2,
        stripe_width=2,
        conv_inplane=8)
    cfg.update(kwargs)
    return METAAdapterViT(
        'vit_base_patch16_224',
        model_kwargs=dict(
            img_size=64,
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=2),
        **cfg)


def n_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters()
               if p.requires_grad or not trainable_only)


# --------------------------------------------------------------- shapes ---


@pytest.mark.parametrize(
    'patch,size',
    [
        (8, (64, 64)),
        (8, (64, 96)),  # non-square
        (8, (40, 72)),  # multiples of 8, not of 32
        (16, (80, 48)),  # multiples of 16, not of 32: 5x3 ViT grid
    ])
def test_output_strides_and_shapes(patch, size):
    model = tiny_meta(patch=patch).eval()
    h, w = size
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    assert len(outs) == 4
    for out, stride in zip(outs, (4, 8, 16, 32)):
        # Defined behaviour: ceil(H/s) x ceil(W/s) at every level.
        assert out.shape == (2, 32, -(-h // stride), -(-w // stride))
        assert torch.isfinite(out).all()


def test_out_channels_and_size_errors():
    model = tiny_meta(out_channels=[8, 16, 24, 40]).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [8, 16, 24, 40]
    with pytest.raises(ValueError, match='divisible by the patch size'):
        model(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match='one value per output'):
        tiny_meta(out_channels=[8, 16])


def test_interaction_indexes():
    assert even_interaction_indexes(12, 4) == [[0, 2], [3, 5], [6, 8], [9, 11]]
    assert even_interaction_indexes(24, 4) == [[0, 5], [6, 11], [12, 17],
                                               [18, 23]]
    assert even_interaction_indexes(5, 2) == [[0, 2], [3, 4]]
    model = tiny_meta(interaction_indexes=[[0, 0], [1, 3]])
    assert model.interaction_indexes == [[0, 0], [1, 3]]
    assert len(model.injectors) == len(model.extractors) == 2
    for bad in ([[0, 1], [3, 3]], [[0, 1], [2, 2]], [[1, 3]]):
        with pytest.raises(ValueError, match='interaction_indexes'):
            tiny_meta(interaction_indexes=bad)


# ------------------------------------------------- cross-shaped attention ---


def masked_reference(q, k, v, num_heads, sw):
    """Full softmax attention over all tokens with a mask that keeps only
    pairs in the same stripe (rows // sw for the first half of the heads,
    columns // sw for the second half)."""
    B, H, W, C = q.shape
    hd = C // num_heads
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    same_row_stripe = (rows[:, None] // sw) == (rows[None] // sw)
    same_col_stripe = (cols[:, None] // sw) == (cols[None] // sw)
    mask = torch.stack([same_row_stripe] * (num_heads // 2) +
                       [same_col_stripe] * (num_heads // 2))  # (h, N, N)

    def heads(t):
        return t.reshape(B, H * W, num_heads, hd).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) * hd**-0.5
    scores = scores.masked_fill(~mask, float('-inf'))
    out = scores.softmax(-1) @ heads(v)
    return out.transpose(1, 2).reshape(B, H, W, C)


@pytest.mark.parametrize('grid,sw', [((4, 6), 2), ((5, 7), 2), ((5, 7), 3),
                                     ((3, 4), 1), ((3, 4), 8)])
def test_cross_shaped_attention_equals_masked_attention(grid, sw):
    torch.manual_seed(0)
    H, W = grid
    q, k, v = (
        torch.randn(2, H, W, 8, dtype=torch.float64, requires_grad=True)
        for _ in range(3))
    out = cross_shaped_attention(q, k, v, num_heads=4, stripe_width=sw)
    ref = masked_reference(q, k, v, 4, sw)
    torch.testing.assert_close(out, ref)
    # Gradients through the strided write-back match too.
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_cross_shaped_attention_module_is_cross_attention():
    torch.manual_seed(0)
    attn = CrossShapedAttention(8, num_heads=2, stripe_width=2).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    ctx = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    q = attn.q(x)
    k, v = attn.kv(ctx).chunk(2, -1)
    ref = attn.proj(masked_reference(q, k, v, 2, 2))
    torch.testing.assert_close(attn(x, ctx), ref)
    # A context change at (row 0, col 3) reaches the cross of stripes
    # through it (rows 0-1, cols 2-3) and nothing else.
    ctx2 = ctx.clone()
    ctx2[0, 0, 3] += 1.0
    delta = (attn(x, ctx2) - attn(x, ctx)).abs().sum(-1)[0]
    rows, cols = torch.meshgrid(
        torch.arange(4), torch.arange(4), indexing='ij')
    in_cross = (rows < 2) | (cols >= 2)
    assert delta[in_cross].gt(0).all() and delta[~in_cross].eq(0).all()
    with pytest.raises(ValueError, match='even'):
        CrossShapedAttention(8, num_heads=3)


# ------------------------------------------------------------ MEA blocks ---


def literal_mea(block: MEABlock, x, y):
    """Fig. 2(a) with every concatenation built explicitly."""
    d = block.dim
    z = torch.cat([x, y], -1)  # the bus
    n = torch.cat([
        F.layer_norm(z[..., :d], (d, ), eps=block.norm_eps),
        F.layer_norm(z[..., d:], (d, ), eps=block.norm_eps)
    ], -1)
    a = block.attn(n[..., :d], n[..., d:])
    m = block.fc2(block.act(block.fc1(n)))
    c = z.permute(0, 3, 1, 2)
    for i, conv in enumerate(block.convs):
        c = conv(block.act(c) if i else c)
    c = c.permute(0, 2, 3, 1)
    return block.fuse(torch.cat([z, a, m, c], -1))


def test_mea_block_equals_literal_concat_form():
    torch.manual_seed(0)
    block = MEABlock(8, num_heads=2, stripe_width=2, mlp_ratio=1.5).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    y = torch.randn(2, 5, 6, 8, dtype=torch.float64) * 30  # other scale
    torch.testing.assert_close(block(x, y), literal_mea(block, x, y))
    # One shared norm: the output does not depend on the scale of a stream
    # through the attention/FFN branches (statistics per stream).
    assert block.fc1.weight.shape == (12, 16)
    assert block.fuse.weight.shape == (8, 48)


def test_cascaded_mea_equals_per_head_loop():
    torch.manual_seed(0)
    cmea = CascadedMEA(
        12, num_cascades=3, num_heads=2, stripe_width=2).double()
    x = torch.randn(2, 4, 6, 12, dtype=torch.float64)
    y = torch.randn(2, 4, 6, 12, dtype=torch.float64)
    outs, prev = [], None
    for i, head in enumerate(cmea.heads):
        sl = slice(4 * i, 4 * i + 4)
        q = x[..., sl] if prev is None else x[..., sl] + prev
        prev = literal_mea(head, q, y[..., sl])
        outs.append(prev)
    ref = cmea.proj(torch.cat(outs, -1))
    torch.testing.assert_close(cmea(x, y), ref)

    # The cascade really feeds head 0 into the last head: perturbing only
    # the first query chunk changes the last head's output.
    def last_head(inp):
        prev = None
        for i, head in enumerate(cmea.heads):
            sl = slice(4 * i, 4 * i + 4)
            q = inp[..., sl] if prev is None else inp[..., sl] + prev
            prev = head(q, y[..., sl])
        return prev

    x2 = x.clone()
    x2[..., :4] += 1.0
    with torch.no_grad():
        assert (last_head(x2) - last_head(x)).abs().max() > 1e-3


# ------------------------------------------------------ parameter counts ---


def mea_params(d, hidden, k):
    attn = (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)  # q, kv, proj
    ffn = (2 * d * hidden + hidden) + (hidden * d + d)
    conv = 3 * (2 * d * k * k + 2 * d)  # three depthwise convs on the bus
    fuse = 6 * d * d + d
    return attn + ffn + conv + fuse  # the shared norm has no parameters


def cmea_params(dim, cascades, mlp_ratio=1.0, k=3):
    d = dim // cascades
    return cascades * mea_params(d, int(round(d * mlp_ratio)), k) + (
        dim * dim + dim)


def spm_params(c, dim):
    convs = (3 * c * 9 + c * c * 9 * 2 + c * 2 * c * 9 + 2 * c * 4 * c * 9 +
             4 * c * 4 * c * 9)
    bns = 2 * (3 * c + 2 * c + 4 * c + 4 * c)
    fcs = (c + 2 * c + 4 * c + 4 * c) * dim + 4 * dim
    return convs + bns + fcs


def test_parameter_counts_frozen_and_unfrozen():
    model = tiny_meta(
        dim=32,
        depth=4,
        num_interactions=2,
        num_cascades=2,
        mlp_ratio=0.5,
        out_channels=[32, 32, 16, 32])
    vit = n_params(model.vit)
    adapter = (
        spm_params(8, 32) + 2 * 2 * cmea_params(32, 2, 0.5) + 2 * 32  # gamma
        + 4 * 2 * 32  # output BN
        + (32 * 16 + 16))  # the one 1x1 output projection
    assert n_params(model.spm) == spm_params(8, 32)
    assert n_params(model.injectors[0]) == cmea_params(32, 2, 0.5)
    assert n_params(model) == vit + adapter
    assert n_params(model, trainable_only=True) == adapter
    assert n_params(model.vit, trainable_only=True) == 0
    unfrozen = tiny_meta(
        dim=32,
        depth=4,
        num_interactions=2,
        num_cascades=2,
        mlp_ratio=0.5,
        out_channels=[32, 32, 16, 32],
        frozen=False)
    assert n_params(unfrozen, trainable_only=True) == vit + adapter


# ----------------------------------------------------------- frozen ViT ---


def test_frozen_vit_gets_no_gradient_and_does_not_change():
    # A non-zero injection scale so that the first step already needs the
    # gradient *through* the frozen blocks into the injectors.
    model = tiny_meta(init_values=0.1)
    model.train()
    assert not model.vit.training and model.spm.training
    vit_before = {k: v.clone() for k, v in model.vit.state_dict().items()}
    adapter_before = {
        n: p.detach().clone()
        for n, p in model.named_parameters() if p.requires_grad
    }
    optim = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = sum(o.pow(2).mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    assert all(p.grad is None for p in model.vit.parameters())
    first_injector = model.injectors[0]
    assert first_injector.proj.weight.grad.abs().sum() > 0
    assert model.gamma.grad[0].abs().sum() > 0
    assert model.spm.stem[0].conv.weight.grad.abs().sum() > 0
    optim.step()
    for k, v in model.vit.state_dict().items():
        assert torch.equal(v, vit_before[k]), k
    changed = [
        n for n, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, adapter_before[n])
    ]
    assert len(changed) == len(adapter_before)


def test_unfrozen_vit_trains_and_zero_gamma_starts_from_the_vit():
    model = tiny_meta(frozen=False).train()
    assert model.vit.training
    assert torch.all(model.gamma == 0)
    loss = sum(o.pow(2).mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # gamma == 0: the injectors do not change the ViT tokens yet.
    assert model.injectors[0].proj.weight.grad.abs().sum() == 0
    assert model.gamma.grad.abs().sum() > 0


def test_recomputation_gives_the_same_outputs_and_gradients():
    """Conv-branch recomputation and full checkpointing change memory, not
    results."""
    x = torch.randn(2, 3, 64, 64)
    results = []
    for with_cp, recompute_conv in ((False, False), (False, True), (True,
                                                                    True)):
        model = tiny_meta(
            init_values=0.1, with_cp=with_cp,
            recompute_conv=recompute_conv).train()
        outs = model(x)
        sum(o.pow(2).mean() for o in outs).backward()
        results.append(
            [o.detach() for o in outs] +
            [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------ registries, weights, configs ---


def test_builds_from_mmseg_and_mmdet_registries():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = dict(
        type='METAAdapterViT',
        model_kwargs=dict(
            img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2),
        num_interactions=1,
        num_cascades=2,
        conv_inplane=4)
    for registry in (SEG_MODELS, DET_MODELS):
        assert isinstance(registry.build(cfg), METAAdapterViT)


def test_pretrained_vit_weights_from_a_local_file(tmp_path):
    import timm
    vit = timm.create_model(
        'vit_base_patch16_224',
        pretrained=False,
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=4,
        num_heads=2)
    path = str(tmp_path / 'vit.pth')
    torch.save(vit.state_dict(), path)
    model = tiny_meta(init_cfg=dict(type='Pretrained', checkpoint=path))
    adapter_before = {
        n: p.detach().clone()
        for n, p in model.named_parameters() if not n.startswith('vit.')
    }
    model.init_weights()
    own = model.vit.state_dict()
    for k, v in vit.state_dict().items():
        if k in own:
            assert torch.equal(own[k], v), k
    for n, p in model.named_parameters():
        if n in adapter_before:
            assert torch.equal(p, adapter_before[n]), n
    assert not any(p.requires_grad for p in model.vit.parameters())


def test_ade20k_vit_b_config_builds():
    from mmengine.config import Config
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = Config.fromfile(osp.join(REPO, 'configs', ADE_CONFIG))
    assert cfg.model.neck is None
    cfg.model.backbone.init_cfg = None  # no ViT-B weights in the test env
    model = SEG_MODELS.build(cfg.model)
    backbone = model.backbone
    assert isinstance(backbone, METAAdapterViT)
    assert backbone.interaction_indexes == [[0, 2], [3, 5], [6, 8], [9, 11]]
    adapter = n_params(backbone, trainable_only=True)
    expected = (
        spm_params(64, 768) + 2 * 4 * cmea_params(768, 8) + 4 * 768 +
        4 * 2 * 768)
    assert adapter == expected == 14_392_640
    assert n_params(backbone.vit, trainable_only=True) == 0
    with torch.no_grad():
        outs = backbone.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(768, 16, 16), (768, 8, 8),
                                                  (768, 4, 4), (768, 2, 2)]


@pytest.mark.slow
def test_toy_seg_training_run(toy_seg_root, tmp_path):
    """A few iterations of the toy config through the Runner: the loss is
    finite, the frozen ViT is bitwise unchanged, the adapter trains, and
    validation reports an mIoU."""
    from apla_mm.testing import ParamSnapshotHook, build_runner, short_run_cfg
    cfg = short_run_cfg(
        TOY_CONFIG,
        str(tmp_path),
        data_root=toy_seg_root,
        max_iters=3,
        val=True)
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    metrics = runner.val_loop.run()
    assert 0.0 <= metrics['mIoU'] <= 100.0
    changed = snapshot.changed()
    vit = [k for k in changed if k.startswith('backbone.vit.')]
    assert vit and not any(changed[k] for k in vit)
    for part in ('backbone.spm.', 'backbone.extractors.', 'backbone.gamma',
                 'decode_head.'):
        assert any(v for k, v in changed.items() if k.startswith(part)), part


def test_detection_configs_use_the_adapter_with_fpn():
    from mmengine.config import Config
    for path, dim in ((DET_TOY_CONFIG, 96), (DET_COCO_CONFIG, 768)):
        cfg = Config.fromfile(osp.join(REPO, 'configs', path))
        assert cfg.default_scope == 'mmdet'
        assert cfg.model.backbone.type == 'METAAdapterViT'
        assert cfg.model.backbone.frozen
        assert cfg.model.neck.type == 'FPN'
        assert cfg.model.neck.in_channels == [dim] * 4


@pytest.mark.slow
def test_toy_det_training_run(toy_coco_root, tmp_path):
    """Two Mask R-CNN iterations on the toy COCO set: finite losses, frozen
    ViT unchanged, adapter and FPN updated."""
    from apla_mm.testing import ParamSnapshotHook, build_runner, short_run_cfg
    cfg = short_run_cfg(
        DET_TOY_CONFIG, str(tmp_path), data_root=toy_coco_root, max_iters=2)
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    scalars = runner.message_hub.log_scalars
    assert torch.isfinite(torch.tensor(scalars['train/loss'].current()))
    changed = snapshot.changed()
    vit = [k for k in changed if k.startswith('backbone.vit.')]
    assert vit and not any(changed[k] for k in vit)
    for part in ('backbone.spm.', 'backbone.extractors.', 'neck.',
                 'roi_head.'):
        assert any(v for k, v in changed.items() if k.startswith(part)), part
