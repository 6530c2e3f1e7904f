"""Published checkpoint layouts load completely into the backbones and give
the official model's features (docs/weights.md).

Each file is written by the official model code where that code is a
package (``transformers``, ``segment-anything``, ``open_clip_torch``: the
``tests`` extra of setup.py), with random weights. Where the official code
is not a package the file follows the key layout of the official
repository's model code, cited at the test. Tiny models, 56-64 px inputs.
"""
import functools
import logging

import pytest
import torch
import torch.nn as nn
from mmengine.logging import MMLogger

from apla_mm.models import TimmViT

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_(module: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter away from its initialisation (biases, norms,
    layer scales and tokens too), so that any entry loaded into the wrong
    place changes the features."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * scale)
    return module.eval()


def tokens(maps: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``."""
    return maps.flatten(2).transpose(1, 2)


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def log():
    logger = MMLogger.get_current_instance()
    handler = LogRecords()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def load(model_name, path, **kwargs):
    """A TimmViT built from ``model_name``, loaded from ``path`` through its
    ``init_cfg`` alone; asserts the load is complete."""
    kwargs.setdefault('output_norm', True)
    model = TimmViT(
        model_name,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)),
        **kwargs)
    model.init_weights()
    report = model.pretrained_report
    assert report['missing'] == [], report['missing']
    assert report['unrecognised'] == [], report['unrecognised']
    assert set(report['loaded']) == set(model.vit.state_dict())
    return model.eval()


# ---------------------------------------------------------------- DINOv2
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=56, patch_size=14)
DINO_TIMM = dict(img_size=56, embed_dim=32, depth=2, num_heads=2)


def hf_dinov2(registers: bool = False, swiglu: bool = False):
    transformers = pytest.importorskip('transformers')
    config = dict(DINO)
    if swiglu:
        config.update(hidden_size=48, use_swiglu_ffn=True)
    if registers:
        model = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(
                num_register_tokens=4, **config))
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**config))
    return perturb_(model)


def dinov2_timm_name(registers: bool, swiglu: bool) -> str:
    if swiglu:
        return 'vit_giant_patch14_dinov2'
    return 'vit_base_patch14_reg4_dinov2' if registers \
        else 'vit_base_patch14_dinov2'


def hf_patch_tokens(model, x, registers):
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    return hidden[:, 1 + (4 if registers else 0):]


@pytest.mark.parametrize('registers,swiglu', [(False, False), (True, False),
                                               (False, True)])
def test_dinov2_transformers_layout(tmp_path, log, registers, swiglu):
    """``facebook/dinov2-*`` on the Hub: ``save_pretrained`` of
    transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``
    (``model.safetensors``), from ``init_cfg`` alone. ViT-g's SwiGLU MLP
    (``mlp.weights_in``) too."""
    hf = hf_dinov2(registers, swiglu)
    hf.save_pretrained(tmp_path)
    kwargs = dict(DINO_TIMM, embed_dim=48 if swiglu else 32)
    model = load(dinov2_timm_name(registers, swiglu),
                 tmp_path / 'model.safetensors', model_kwargs=kwargs)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = tokens(model(x)[0])
    torch.testing.assert_close(
        ours, hf_patch_tokens(hf, x, registers), atol=ATOL, rtol=0)
    report = model.pretrained_report
    assert report['layout'].startswith('transformers DINOv2')
    assert list(report['on_purpose']) == [
        'mask token (masked-image pretraining)']
    assert any('mask token' in m for m in log)


def test_dinov2_transformers_classifier(tmp_path):
    """``Dinov2ForImageClassification`` files: the ``dinov2.`` backbone
    loads, the ``classifier`` is named as left out."""
    transformers = pytest.importorskip('transformers')
    hf = perturb_(transformers.Dinov2ForImageClassification(
        transformers.Dinov2Config(num_labels=5, **DINO)))
    hf.save_pretrained(tmp_path)
    model = load('vit_base_patch14_dinov2', tmp_path / 'model.safetensors',
                 model_kwargs=DINO_TIMM)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = tokens(model(x)[0])
    torch.testing.assert_close(
        ours, hf_patch_tokens(hf.dinov2, x, False), atol=ATOL, rtol=0)
    assert model.pretrained_report['on_purpose']['classification head'] == [
        'classifier.bias', 'classifier.weight'
    ] or sorted(model.pretrained_report['on_purpose'][
        'classification head']) == ['classifier.bias', 'classifier.weight']


def dinov2_hub_state_dict(hf) -> dict:
    """Meta's torch-hub layout of ``dinov2_vit*14[_reg4]_pretrain.pth``,
    filled from a transformers DINOv2 (whose features are the reference).

    Names and shapes follow facebookresearch/dinov2 at
    b8931f7bf91576930313be2c6d6af376033b35f0:
    ``dinov2/models/vision_transformer.py`` (``cls_token`` (1, 1, D),
    ``pos_embed`` (1, 1 + N, D), ``register_tokens`` (1, R, D),
    ``mask_token`` (1, D), ``patch_embed.proj``, ``blocks.N``, ``norm``,
    ``head = nn.Identity()``; ``hub/backbones.py`` builds it with
    ``block_chunks=0`` and loads the file strictly), ``dinov2/layers/
    block.py`` (``norm1``, ``attn``, ``ls1``, ``norm2``, ``mlp``, ``ls2``),
    ``layers/attention.py`` (one ``qkv`` Linear, reshaped to
    ``(B, N, 3, heads, head_dim)``: rows are query, key, value),
    ``layers/layer_scale.py`` (``gamma``), ``layers/mlp.py`` (``fc1``,
    ``fc2``).
    """
    emb = hf.embeddings
    sd = {
        'cls_token': emb.cls_token,
        'mask_token': emb.mask_token,
        'pos_embed': emb.position_embeddings,
        'patch_embed.proj.weight': emb.patch_embeddings.projection.weight,
        'patch_embed.proj.bias': emb.patch_embeddings.projection.bias,
        'norm.weight': hf.layernorm.weight,
        'norm.bias': hf.layernorm.bias,
    }
    if hasattr(emb, 'register_tokens'):
        sd['register_tokens'] = emb.register_tokens
    for i, layer in enumerate(hf.encoder.layer):
        att = layer.attention.attention
        b = f'blocks.{i}.'
        sd.update({
            b + 'norm1.weight': layer.norm1.weight,
            b + 'norm1.bias': layer.norm1.bias,
            b + 'attn.qkv.weight': torch.cat(
                [att.query.weight, att.key.weight, att.value.weight]),
            b + 'attn.qkv.bias': torch.cat(
                [att.query.bias, att.key.bias, att.value.bias]),
            b + 'attn.proj.weight': layer.attention.output.dense.weight,
            b + 'attn.proj.bias': layer.attention.output.dense.bias,
            b + 'ls1.gamma': layer.layer_scale1.lambda1,
            b + 'norm2.weight': layer.norm2.weight,
            b + 'norm2.bias': layer.norm2.bias,
            b + 'mlp.fc1.weight': layer.mlp.fc1.weight,
            b + 'mlp.fc1.bias': layer.mlp.fc1.bias,
            b + 'mlp.fc2.weight': layer.mlp.fc2.weight,
            b + 'mlp.fc2.bias': layer.mlp.fc2.bias,
            b + 'ls2.gamma': layer.layer_scale2.lambda1,
        })
    return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize('registers', [False, True])
def test_dinov2_torch_hub_layout(tmp_path, registers):
    """``dinov2_vitb14_pretrain.pth`` / ``dinov2_vitb14_reg4_pretrain.pth``
    (plain state dicts) through timm's filter; features equal transformers'
    port of the same weights."""
    hf = hf_dinov2(registers)
    path = tmp_path / 'dinov2_vitb14_pretrain.pth'
    torch.save(dinov2_hub_state_dict(hf), path)
    model = load(dinov2_timm_name(registers, False), path,
                 model_kwargs=DINO_TIMM)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = tokens(model(x)[0])
    torch.testing.assert_close(
        ours, hf_patch_tokens(hf, x, registers), atol=ATOL, rtol=0)


@pytest.mark.parametrize('registers', [False, True])
def test_dinov2_timm_safetensors(tmp_path, registers):
    """timm's own files (``timm/vit_base_patch14_dinov2.lvd142m``,
    ``model.safetensors``): written by timm's model, loaded unchanged, the
    classifier head of the full model named as left out."""
    import timm
    from safetensors.torch import save_file
    name = dinov2_timm_name(registers, False)
    full = perturb_(timm.create_model(name, num_classes=3, **DINO_TIMM))
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in full.state_dict().items()},
              str(path))
    model = load(name, path, model_kwargs=dict(DINO_TIMM, num_classes=3))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = full.forward_features(x)[:, full.num_prefix_tokens:]
        ours = tokens(model(x)[0])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    assert sorted(model.pretrained_report['on_purpose'][
        'classifier/pooling head']) == ['head.bias', 'head.weight']


# ------------------------------------------------------------------- SAM
SAM_TIMM = dict(img_size=64, patch_size=8, embed_dim=32, depth=2,
                num_heads=2, mlp_ratio=2.0, window_size=4,
                global_attn_indexes=(1, ), neck_chans=16)


def meta_sam():
    """segment_anything's ``Sam`` as ``build_sam._build_sam`` assembles it,
    at a tiny size."""
    pytest.importorskip('segment_anything')
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder,
                                           PromptEncoder, Sam,
                                           TwoWayTransformer)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            mlp_ratio=2, out_chans=16, qkv_bias=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=[1]),
        prompt_encoder=PromptEncoder(
            embed_dim=16, image_embedding_size=(8, 8),
            input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=1, embedding_dim=16, mlp_dim=32, num_heads=2),
            transformer_dim=16, iou_head_depth=1, iou_head_hidden_dim=16),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375])
    return perturb_(sam)


SAM_PARTS = 'SAM prompt encoder and mask decoder'


def test_sam_meta_release(tmp_path, log):
    """``sam_vit_{b,l,h}_*.pth``: ``Sam.state_dict()`` of segment_anything
    (``build_sam`` loads the file with ``sam.load_state_dict``). The image
    encoder's output (after the neck) equals the official encoder's; the
    prompt encoder and mask decoder are named as left out."""
    sam = meta_sam()
    path = tmp_path / 'sam_vit_b_01ec64.pth'
    torch.save(sam.state_dict(), path)
    model = load('samvit_base_patch16', path, model_kwargs=SAM_TIMM)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x)[0], sam.image_encoder(x), atol=ATOL, rtol=0)
    parts = model.pretrained_report['on_purpose']
    assert list(parts) == [SAM_PARTS]
    assert {k.split('.')[0] for k in parts[SAM_PARTS]} == {
        'prompt_encoder', 'mask_decoder'}
    assert any(SAM_PARTS in m for m in log)


def test_sam_transformers_layout(tmp_path):
    """``facebook/sam-vit-*`` on the Hub: ``save_pretrained`` of
    transformers' ``SamModel``. Block outputs and the neck's output equal
    its vision encoder's."""
    transformers = pytest.importorskip('transformers')
    vision = transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=8, output_channels=16, window_size=4,
        global_attn_indexes=[1], mlp_dim=64)
    hf = perturb_(transformers.SamModel(
        transformers.SamConfig(vision_config=vision.to_dict())))
    hf.save_pretrained(tmp_path)
    path = tmp_path / 'model.safetensors'
    neck = load('samvit_base_patch16', path, model_kwargs=SAM_TIMM)
    blocks = load('samvit_base_patch16', path, model_kwargs=SAM_TIMM,
                  out_indices=(0, 1), output_norm=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = hf.vision_encoder(x, output_hidden_states=True)
        torch.testing.assert_close(
            neck(x)[0], out.last_hidden_state, atol=ATOL, rtol=0)
        for ours, theirs in zip(blocks(x), out.hidden_states[1:]):
            torch.testing.assert_close(
                ours, theirs.permute(0, 3, 1, 2), atol=ATOL, rtol=0)
    assert neck.pretrained_report['layout'] == 'transformers SAM'
    assert {k.split('.')[0] for k in neck.pretrained_report['on_purpose'][
        SAM_PARTS]} == {'prompt_encoder', 'mask_decoder',
                        'shared_image_embedding'}
    assert 'SAM neck (pruned: output_norm=False)' in \
        blocks.pretrained_report['on_purpose']


# ------------------------------------------------------------ CLIP/SigLIP
def test_open_clip_vit(tmp_path):
    """An open_clip ``CLIP`` with open_clip's own ViT (the layout of the
    LAION and OpenAI releases, ``open_clip_pytorch_model.bin``): timm's
    filter converts ``visual.*``; the text tower is named as left out;
    block tokens equal open_clip's ``forward_intermediates``."""
    open_clip = pytest.importorskip('open_clip')
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    clip = perturb_(CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16,
                                 patch_size=8, image_size=64),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32,
                             heads=2, layers=1)))
    path = tmp_path / 'open_clip_pytorch_model.bin'
    torch.save(clip.state_dict(), path)
    model = load('vit_base_patch16_clip_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=dict(
                     img_size=64, patch_size=8, embed_dim=32, depth=2,
                     num_heads=2))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = clip.visual.forward_intermediates(
            x, indices=[0, 1], intermediates_only=True,
            output_fmt='NLC')['image_intermediates']
        for ours, theirs in zip(model(x), expected):
            torch.testing.assert_close(
                tokens(ours), theirs, atol=ATOL, rtol=0)
    parts = model.pretrained_report['on_purpose']
    assert 'token_embedding.weight' in parts[
        'CLIP text tower and logit scale']
    assert 'classifier/pooling head' in parts  # visual.proj, ln_post
    del open_clip


def test_open_clip_siglip_timm_trunk(tmp_path):
    """open_clip's SigLIP models (``ViT-B-16-SigLIP``: a timm trunk with
    ``timm_pool='map'``, ``timm_proj='none'``, stored as ``visual.trunk.*``,
    and a separate ``text.*`` tower); here with timm's small
    ``vit_tiny_patch16_224`` as the trunk."""
    pytest.importorskip('open_clip')
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
    clip = perturb_(CustomTextCLIP(
        embed_dim=192,
        vision_cfg=CLIPVisionCfg(
            timm_model_name='vit_tiny_patch16_224', timm_pool='map',
            timm_proj='none', image_size=224),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32,
                             heads=2, layers=1),
        init_logit_bias=-10))
    path = tmp_path / 'open_clip_model.safetensors'
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()},
              str(path))
    model = load('vit_tiny_patch16_224', path, output_norm=False,
                 out_indices=(5, 11))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = clip.visual.trunk.forward_intermediates(
            x, indices=[5, 11], intermediates_only=True)
        for ours, theirs in zip(model(x), expected):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    parts = model.pretrained_report['on_purpose']
    assert 'logit_bias' in parts['CLIP text tower and logit scale']
    assert any(k.startswith('attn_pool.')
               for k in parts['classifier/pooling head'])
