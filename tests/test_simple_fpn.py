"""LN2d and SimpleFPN: shapes, strides, odd input sizes, mmdet integration."""
import math

import pytest
import torch
import torch.nn as nn

import apla_mm  # noqa: F401  (registers TimmViT, SimpleFPN, LN2d)
from apla_mm.models import LN2d, SimpleFPN, TimmViT


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Small ops: one intra-op thread avoids OpenMP oversubscription on busy
    2-core machines (10x slower there with two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit(patch_size: int = 16, embed_dim: int = 32) -> TimmViT:
    return TimmViT(
        'vit_base_patch16_224',
        model_kwargs=dict(
            img_size=64, patch_size=patch_size, embed_dim=embed_dim, depth=1,
            num_heads=2),
        out_indices=(-1, ))


# --------------------------------------------------------------------- LN2d
def test_ln2d_matches_layernorm_over_channels():
    torch.manual_seed(0)
    norm = LN2d(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    reference = nn.functional.layer_norm(
        x.permute(0, 2, 3, 1), (8, ), norm.weight, norm.bias,
        norm.eps).permute(0, 3, 1, 2)
    out = norm(x)
    assert out.shape == x.shape
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference)
    # every position is normalised over its channels
    plain = LN2d(8, elementwise_affine=False)(x)
    torch.testing.assert_close(
        plain.mean(1), torch.zeros(2, 5, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        plain.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3,
        rtol=0)
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        norm(torch.randn(2, 8, 5))


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_ln2d_builds_from_norm_cfg(scope):
    from mmcv.cnn import ConvModule, build_norm_layer
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        name, layer = build_norm_layer(dict(type='LN2d', eps=1e-6), 16)
        conv = ConvModule(4, 16, 3, padding=1, norm_cfg=dict(type='LN2d'))
    assert name == 'ln' and isinstance(layer, LN2d) and layer.eps == 1e-6
    assert isinstance(conv.norm, LN2d)
    assert conv.conv.bias is None  # bias='auto' drops it before a norm
    assert conv(torch.randn(1, 4, 6, 6)).shape == (1, 16, 6, 6)


# ---------------------------------------------------------------- SimpleFPN
def test_simple_fpn_is_registered_for_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry in (DET_MODELS, SEG_MODELS):
        assert registry.get('SimpleFPN') is SimpleFPN
        assert registry.get('LN2d') is LN2d


def test_simple_fpn_layers_follow_vitdet():
    neck = SimpleFPN(
        backbone_channel=64, in_channels=[16, 32, 64, 64], out_channels=24)
    assert neck.in_channels == [16, 32, 64, 64]
    up4, up2, same, down2 = neck.samplers
    assert [type(m) for m in up4] == [
        nn.ConvTranspose2d, LN2d, nn.GELU, nn.ConvTranspose2d
    ]
    assert [type(m) for m in up2] == [nn.ConvTranspose2d]
    assert isinstance(same, nn.Identity)
    assert isinstance(down2[0], nn.MaxPool2d) and down2[0].ceil_mode
    for lateral, fpn_conv in zip(neck.lateral_convs, neck.fpn_convs):
        assert lateral.conv.kernel_size == (1, 1)
        assert fpn_conv.conv.kernel_size == (3, 3)
        assert isinstance(lateral.norm, LN2d) and not lateral.with_activation
        assert isinstance(fpn_conv.norm, LN2d)


@pytest.mark.parametrize('size', [(128, 128), (96, 160), (80, 112),
                                  (48, 144), (16, 16)])
def test_pyramid_shapes_and_strides(size):
    """Stride-16 ViT map -> strides 4, 8, 16, 32, 64; every level covers the
    image (ceil sizes) also when H, W are not multiples of 32 or 64."""
    h, w = size
    vit = tiny_vit()
    neck = SimpleFPN(backbone_channel=32, out_channels=24, num_outs=5)
    feats = vit(torch.randn(2, 3, h, w))
    assert len(feats) == 1 and feats[0].shape == (2, 32, h // 16, w // 16)
    outs = neck(feats)
    assert len(outs) == 5
    for out, stride in zip(outs, (4, 8, 16, 32, 64)):
        assert out.shape == (2, 24, math.ceil(h / stride),
                             math.ceil(w / stride)), stride
        # the map covers the whole padded image and no more than one cell
        assert out.shape[-2] * stride >= h > (out.shape[-2] - 1) * stride
        assert out.shape[-1] * stride >= w > (out.shape[-1] - 1) * stride
    # divisible by 32: the stride-32 level is exact
    if h % 32 == 0 and w % 32 == 0:
        assert outs[3].shape[-2:] == (h // 32, w // 32)


def test_patch8_backbone_with_other_scale_factors():
    vit = tiny_vit(patch_size=8)
    neck = SimpleFPN(
        backbone_channel=32,
        out_channels=16,
        num_outs=5,
        scale_factors=(2.0, 1.0, 0.5, 0.25))
    assert neck.in_channels == [16, 32, 32, 32]
    outs = neck(vit(torch.randn(1, 3, 72, 40)))  # 9 x 5 tokens
    assert [tuple(o.shape[-2:]) for o in outs] == [(18, 10), (9, 5), (5, 3),
                                                   (3, 2), (2, 1)]


def test_simple_fpn_accepts_tensor_and_picks_in_index():
    neck = SimpleFPN(backbone_channel=8, out_channels=8, num_outs=4)
    x = torch.randn(1, 8, 4, 4)
    other = torch.randn(1, 3, 4, 4)
    ref = neck(x)
    assert len(ref) == 4
    for a, b in zip(ref, neck((other, x))):  # in_index=-1: the last map
        torch.testing.assert_close(a, b)


def test_simple_fpn_backward_reaches_all_parameters():
    neck = SimpleFPN(backbone_channel=16, out_channels=8)
    x = torch.randn(2, 16, 4, 6, requires_grad=True)
    sum(o.sum() for o in neck(x)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in neck.parameters())


@pytest.mark.parametrize(
    'kwargs, match',
    [(dict(scale_factors=(3.0, 1.0)), 'power of two'),
     (dict(scale_factors=(1.0, 2.0)), 'strictly decreasing'),
     (dict(scale_factors=()), 'must not be empty'),
     (dict(num_outs=3), 'num_outs=3'),
     (dict(in_channels=[192, 384, 768, 768]), 'does not match'),
     (dict(backbone_channel=6), 'divisible by 4')])
def test_simple_fpn_rejects_bad_settings(kwargs, match):
    args = dict(backbone_channel=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SimpleFPN(**args)


def test_simple_fpn_clear_errors_on_wrong_inputs():
    neck = SimpleFPN(backbone_channel=32)
    with pytest.raises(ValueError, match='backbone_channel=32'):
        neck((torch.randn(1, 48, 4, 4), ))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        neck((torch.randn(1, 16, 32), ))
    with pytest.raises(ValueError, match='no backbone output'):
        neck(())
    # sizes that are not a multiple of the patch size stop at the backbone
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        tiny_vit()(torch.randn(1, 3, 120, 128))


# ------------------------------------------------------- inside Mask R-CNN
def _tiny_mask_rcnn_cfg(pad_size_divisor: int):
    from mmengine.config import Config

    from apla_mm.testing import repo_config
    cfg = Config.fromfile(
        repo_config('_base_/models/mask-rcnn_timm-vit-tiny_simple-fpn.py'))
    cfg.model.data_preprocessor.pad_size_divisor = pad_size_divisor
    return cfg.model


def _det_batch(sizes, pad_mask=True):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs, samples = [], []
    for h, w in sizes:
        inputs.append(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.)))
        gt = InstanceData()
        gt.bboxes = torch.tensor([[4., 6., 40., 44.], [30., 20., 70., 60.]])
        gt.labels = torch.tensor([0, 2])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 6:44, 4:40] = 1
        masks[1, 20:60, 30:70] = 1
        gt.masks = BitmapMasks(masks.numpy(), h, w)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@pytest.mark.parametrize('pad_size_divisor, sizes', [
    (32, [(112, 80), (96, 128)]),
    (16, [(112, 80), (80, 112)]),
])
def test_mask_rcnn_on_sizes_not_divisible_by_32(pad_size_divisor, sizes):
    """The configs pad to 32 (exact pyramid); padding only to the patch size
    (16) also trains and predicts, the pyramid covering the padded input."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    model = MODELS.build(_tiny_mask_rcnn_cfg(pad_size_divisor))
    model.init_weights()
    data = model.data_preprocessor(_det_batch(sizes), training=True)
    batch_h, batch_w = data['inputs'].shape[-2:]
    assert batch_h % pad_size_divisor == 0 and batch_w % pad_size_divisor == 0
    if pad_size_divisor == 16:
        assert (batch_h % 32, batch_w % 32) != (0, 0)
    feats = model.extract_feat(data['inputs'])
    strides = model.rpn_head.prior_generator.strides
    assert len(feats) == len(strides) == 5
    for feat, (stride, _) in zip(feats, strides):
        assert feat.shape[-2:] == (math.ceil(batch_h / stride),
                                   math.ceil(batch_w / stride))
    model.train()
    losses = model.loss(data['inputs'], data['data_samples'])
    total, log_vars = model.parse_losses(losses)
    assert torch.isfinite(total) and total > 0
    assert {'loss_rpn_cls', 'loss_cls', 'loss_mask'} <= set(log_vars)
    total.backward()
    assert model.backbone.vit.blocks[0].attn.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(_det_batch(sizes), training=False)
        results = model.predict(data['inputs'], data['data_samples'])
    for result, (h, w) in zip(results, sizes):
        pred = result.pred_instances
        assert pred.masks.shape[-2:] == (h, w)
        assert len(pred.bboxes) == len(pred.scores) == len(pred.masks)
