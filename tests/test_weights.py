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
    import transformers  # imported here: slow to import
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
    import transformers  # imported here: slow to import
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
    assert sorted(model.pretrained_report['on_purpose'][
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
    import transformers  # imported here: slow to import
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


def test_open_clip_siglip_timm_trunk(tmp_path):
    """open_clip's SigLIP models (``ViT-B-16-SigLIP``: a timm trunk with
    ``timm_pool='map'``, ``timm_proj='none'``, stored as ``visual.trunk.*``,
    and a separate ``text.*`` tower); here with timm's small
    ``vit_tiny_patch16_224`` as the trunk."""
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


# ---------------------------------- releases of repositories, not packages
# The official code of these releases is not a package. Each file follows
# the key layout of the official repository's model code (cited); the
# weights come from the timm port of the same model (perturbed at random),
# whose features are the reference.
VIT = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def timm_source(name, **kwargs):
    import timm
    return perturb_(timm.create_model(name, **kwargs))


def block_tokens(source, x, indices=(-1, )):
    """The source model's block outputs without prefix tokens, NCHW."""
    with torch.no_grad():
        return source.forward_intermediates(
            x, indices=list(indices), norm=False, output_fmt='NCHW',
            intermediates_only=True)


def assert_same(model, source, x, indices=(-1, )):
    with torch.no_grad():
        for ours, theirs in zip(model(x), block_tokens(source, x, indices)):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_mae_pretrain(tmp_path):
    """``mae_pretrain_vit_{base,large,huge}.pth``: ``{'model': ...}`` of
    facebookresearch/mae at efb2a8062c206524e35e47d04501ed4f544c0ae8,
    ``models_mae.py`` ``MaskedAutoencoderViT``: the encoder is timm's
    ``PatchEmbed``/``Block`` (``patch_embed.proj``, ``cls_token``,
    ``pos_embed``, ``blocks.N``, ``norm``), the decoder ``decoder_embed``,
    ``mask_token`` (1, 1, Dd), ``decoder_pos_embed``, ``decoder_blocks.N``,
    ``decoder_norm``, ``decoder_pred`` (the visualisation releases keep
    it)."""
    import timm
    source = timm_source('vit_base_patch16_224', num_classes=0, **VIT)
    decoder = timm.create_model('vit_base_patch16_224', num_classes=0,
                                img_size=64, patch_size=8, embed_dim=16,
                                depth=1, num_heads=2)
    sd = dict(source.state_dict())
    sd.update({
        'decoder_embed.weight': torch.randn(16, 32),
        'decoder_embed.bias': torch.randn(16),
        'mask_token': torch.randn(1, 1, 16),
        'decoder_pos_embed': torch.randn(1, 65, 16),
        'decoder_norm.weight': torch.randn(16),
        'decoder_norm.bias': torch.randn(16),
        'decoder_pred.weight': torch.randn(8 * 8 * 3, 16),
        'decoder_pred.bias': torch.randn(8 * 8 * 3),
    })
    sd.update({f'decoder_{k}': v for k, v in decoder.state_dict().items()
               if k.startswith('blocks.')})
    path = tmp_path / 'mae_visualize_vit_large.pth'
    torch.save({'model': sd}, path)
    model = load('vit_base_patch16_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=VIT)
    assert_same(model, source, torch.randn(2, 3, 64, 64), (0, 1))
    parts = model.pretrained_report['on_purpose']
    assert len(parts['MAE decoder']) == 8 + len(
        [k for k in decoder.state_dict() if k.startswith('blocks.')]) - 1
    assert parts['mask token (masked-image pretraining)'] == ['mask_token']


def test_deit_and_deit3(tmp_path):
    """DeiT ``deit_base_patch16_224-b5f2ef4d.pth``: ``{'model': ...}`` of
    facebookresearch/deit at 7e160fe43f0252d17191b71cbb5826254114ea5b,
    ``models.py`` (timm's ``VisionTransformer``, names unchanged, with
    ``head``). DeiT-III ``deit_3_base_224_21k.pth``: ``models_v2.py``
    ``vit_models`` with ``Layer_scale_init_Block``: ``gamma_1``/``gamma_2``
    per block, ``pos_embed`` of the patches only (1, N, D; the class token
    is added after it), ``norm``, ``head``."""
    source = timm_source('vit_base_patch16_224', num_classes=10, **VIT)
    path = tmp_path / 'deit_base_patch16_224.pth'
    torch.save({'model': source.state_dict()}, path)
    model = load('vit_base_patch16_224', path, output_norm=False,
                 model_kwargs=dict(VIT, num_classes=10))
    assert_same(model, source, torch.randn(2, 3, 64, 64))
    assert 'classifier/pooling head' in model.pretrained_report['on_purpose']

    deit3 = timm_source('deit3_base_patch16_224', num_classes=10, **VIT)
    assert deit3.pos_embed.shape == (1, 64, 32)  # no class-token position
    sd = {}
    for key, value in deit3.state_dict().items():
        key = key.replace('.ls1.gamma', '.gamma_1')
        sd[key.replace('.ls2.gamma', '.gamma_2')] = value
    assert 'blocks.0.gamma_1' in sd
    path = tmp_path / 'deit_3_base_224_21k.pth'
    torch.save({'model': sd}, path)
    model = load('deit3_base_patch16_224', path, output_norm=False,
                 model_kwargs=dict(VIT, num_classes=10))
    assert_same(model, deit3, torch.randn(2, 3, 64, 64))


EVA = dict(img_size=56, embed_dim=32, depth=2, num_heads=2,
           ref_feat_shape=(4, 4))


def test_eva02_baai_release(tmp_path):
    """EVA-02 masked-image-modeling releases (``eva02_B_pt_in21k_p14.pt``):
    ``{'module': ...}`` of baaivision/EVA at
    5623d08bb08a8268c7bc18e1d9b8b4bd651fe4d9, ``EVA-02/asuka/
    modeling_pretrain.py`` ``VisionTransformerForMaskedImageModeling``
    (``cls_token``, ``mask_token`` (1, 1, D), ``pos_embed``, ``rope.*``,
    ``blocks.N``, ``norm``, ``lm_head``) with ``modeling_finetune.py``'s
    ``Block``: ``attn.{q_proj, k_proj, v_proj}`` without bias (sub-LN
    models), ``attn.q_bias``/``attn.v_bias``, ``attn.rope.*`` (the shared
    ``VisionRotaryEmbeddingFast``: ``freqs_cos``/``freqs_sin`` buffers),
    ``attn.proj``, SwiGLU ``mlp.{w1 (gate), w2, ffn_ln, w3}``. And timm's
    own file (``timm/eva02_base_patch14_224.mint_in22k``)."""
    source = timm_source('eva02_base_patch14_224', **EVA)
    head_dim = 16
    sd = {'mask_token': torch.randn(1, 1, 32),
          'lm_head.weight': torch.randn(24, 32),
          'lm_head.bias': torch.randn(24),
          'rope.freqs_cos': torch.randn(16, head_dim),
          'rope.freqs_sin': torch.randn(16, head_dim),
          'norm.weight': source.fc_norm.weight.detach().clone(),
          'norm.bias': source.fc_norm.bias.detach().clone()}
    renames = (('mlp.fc1_g.', 'mlp.w1.'), ('mlp.fc1_x.', 'mlp.w2.'),
               ('mlp.norm.', 'mlp.ffn_ln.'), ('mlp.fc2.', 'mlp.w3.'),
               ('attn.q_proj.bias', 'attn.q_bias'),
               ('attn.v_proj.bias', 'attn.v_bias'))
    for key, value in source.state_dict().items():
        if key.startswith('fc_norm.'):
            continue
        for old, new in renames:
            key = key.replace(old, new)
        sd[key] = value
    for i in range(2):
        sd[f'blocks.{i}.attn.rope.freqs_cos'] = sd['rope.freqs_cos']
        sd[f'blocks.{i}.attn.rope.freqs_sin'] = sd['rope.freqs_sin']
    path = tmp_path / 'eva02_B_pt_in21k_p14.pt'
    torch.save({'module': sd}, path)
    model = load('eva02_base_patch14_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=EVA)
    x = torch.randn(2, 3, 56, 56)
    assert_same(model, source, x, (0, 1))
    parts = model.pretrained_report['on_purpose']
    assert sorted(parts['masked-image-modeling head']) == [
        'lm_head.bias', 'lm_head.weight']
    assert len(parts['fixed index/rotary tables (timm computes its '
                     'own)']) == 6

    from safetensors.torch import save_file
    path = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(path))
    model = load('eva02_base_patch14_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=EVA)
    assert_same(model, source, x, (0, 1))


BEIT = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def test_beitv2_releases(tmp_path):
    """BEiT v2 (microsoft/unilm at 80d673a1c3462406900711c20275162c91156767,
    ``beit2/``). Pretraining releases (``beitv2_base_patch16_224_pt1k.pth``,
    ``{'model': ...}``): ``modeling_pretrain.py``
    ``VisionTransformerForMaskedImageModelingCLS`` with the defaults of
    ``run_beitv2_pretraining.py`` (no absolute position embedding, one
    shared ``rel_pos_bias.{relative_position_bias_table,
    relative_position_index}``), ``mask_token``, ``blocks.N.{gamma_1,
    gamma_2, norm1, attn.{qkv.weight, q_bias, v_bias, proj}, norm2,
    mlp.{fc1, fc2}}`` (``modeling_finetune.py`` ``Block``), ``norm``,
    ``lm_head``, ``cls_pt_layers.N``. The shared table goes to every block,
    as ``run_class_finetuning.py`` does. Fine-tuned releases
    (``..._ft21k.pth``) carry a table and index per block."""
    source = timm_source('beitv2_base_patch16_224', num_classes=0, **BEIT)
    table = source.blocks[0].attn.relative_position_bias_table
    with torch.no_grad():
        source.blocks[1].attn.relative_position_bias_table.copy_(table)
    index_shape = (65, 65)
    sd = {'mask_token': torch.randn(1, 1, 32),
          'lm_head.weight': torch.randn(24, 32),
          'lm_head.bias': torch.randn(24),
          'norm.weight': torch.randn(32), 'norm.bias': torch.randn(32),
          'rel_pos_bias.relative_position_bias_table': table.detach(),
          'rel_pos_bias.relative_position_index': torch.zeros(
              index_shape, dtype=torch.long)}
    for key, value in source.state_dict().items():
        if key.endswith('relative_position_bias_table'):
            continue
        sd[key] = value
        if key.startswith('blocks.1.'):
            sd['cls_pt_layers.0.' + key[len('blocks.1.'):]] = value
    path = tmp_path / 'beitv2_base_patch16_224_pt1k.pth'
    torch.save({'model': sd}, path)
    model = load('beitv2_base_patch16_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=BEIT)
    x = torch.randn(2, 3, 64, 64)
    assert_same(model, source, x, (0, 1))
    report = model.pretrained_report
    assert 'shared relative position bias copied' in report['layout']
    assert any(k.startswith('cls_pt_layers.')
               for k in report['on_purpose']['masked-image-modeling head'])

    # fine-tuned release: a table and an index per block, fc_norm and head
    ft = timm_source('beitv2_base_patch16_224', num_classes=7, **BEIT)
    sd = dict(ft.state_dict())
    for i in range(2):
        sd[f'blocks.{i}.attn.relative_position_index'] = torch.zeros(
            index_shape, dtype=torch.long)
    path = tmp_path / 'beitv2_base_patch16_224_pt1k_ft21k.pth'
    torch.save({'model': sd}, path)
    model = load('beitv2_base_patch16_224', path, output_norm=False,
                 out_indices=(0, 1), model_kwargs=dict(BEIT, num_classes=7))
    assert_same(model, ft, x, (0, 1))


# ------------------------------- .npz and mmseg's / mmdet's own backbones
def run_converter(package: str, script: str, *args: str) -> None:
    """Run one of ``<package>/.mim/tools/model_converters/<script>`` as its
    command line would (``python <script> SRC DST``), in this process."""
    import os.path as osp
    import runpy
    import sys
    module = __import__(package)
    path = osp.join(osp.dirname(module.__file__), '.mim', 'tools',
                    'model_converters', script)
    argv = sys.argv
    sys.argv = [path, *map(str, args)]
    try:
        runpy.run_path(path, run_name='__main__')
    finally:
        sys.argv = argv


def big_vision_npz(source, path) -> None:
    """An AugReg/big_vision ``.npz`` (``Ti_16-i21k-300ep-...npz``) of the
    ViT ``source``, names and shapes of google-research/vision_transformer at
    c6de1e5378c9831a8477feb30994971bdc409e46, ``vit_jax/models_vit.py``:
    flax names its submodules by class and order, so ``Encoder1DBlock`` holds
    ``LayerNorm_0``, ``MultiHeadDotProductAttention_1`` (``query``/``key``/
    ``value`` kernels (D, heads, head_dim), ``out`` (heads, head_dim, D)),
    ``LayerNorm_2``, ``MlpBlock_3`` (``Dense_0``, ``Dense_1``); ``embedding``
    is a Conv (kernel HWIO), ``cls`` (1, 1, D), ``Transformer/posembed_input/
    pos_embedding`` (1, 1 + N, D), ``Transformer/encoder_norm``, ``head``.
    Dense kernels are (in, out): torch weights transposed."""
    import numpy as np
    sd = {k: v.detach().numpy() for k, v in source.state_dict().items()}
    d = source.embed_dim
    heads = source.blocks[0].attn.num_heads
    out = {
        'embedding/kernel': sd['patch_embed.proj.weight'].transpose(
            2, 3, 1, 0),
        'embedding/bias': sd['patch_embed.proj.bias'],
        'cls': sd['cls_token'],
        'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
        'Transformer/encoder_norm/scale': sd['norm.weight'],
        'Transformer/encoder_norm/bias': sd['norm.bias'],
        'head/kernel': sd['head.weight'].T,
        'head/bias': sd['head.bias'],
    }
    for i in range(len(source.blocks)):
        b, j = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
        mha = j + 'MultiHeadDotProductAttention_1/'
        qkv_w = sd[b + 'attn.qkv.weight'].reshape(3, d, d)
        qkv_b = sd[b + 'attn.qkv.bias'].reshape(3, heads, d // heads)
        for n, name in enumerate(('query', 'key', 'value')):
            out[mha + name + '/kernel'] = qkv_w[n].T.reshape(
                d, heads, d // heads)
            out[mha + name + '/bias'] = qkv_b[n]
        out[mha + 'out/kernel'] = sd[b + 'attn.proj.weight'].T.reshape(
            heads, d // heads, d)
        out[mha + 'out/bias'] = sd[b + 'attn.proj.bias']
        for norm, ln in (('norm1', 'LayerNorm_0'), ('norm2', 'LayerNorm_2')):
            out[f'{j}{ln}/scale'] = sd[f'{b}{norm}.weight']
            out[f'{j}{ln}/bias'] = sd[f'{b}{norm}.bias']
        for fc, dense in (('fc1', 'Dense_0'), ('fc2', 'Dense_1')):
            out[f'{j}MlpBlock_3/{dense}/kernel'] = sd[f'{b}mlp.{fc}.weight'].T
            out[f'{j}MlpBlock_3/{dense}/bias'] = sd[f'{b}mlp.{fc}.bias']
    np.savez(path, **{k: np.ascontiguousarray(v) for k, v in out.items()})


#: vitjax2mmseg.py converts 12 blocks (24 for files named 'L_16-i21k').
VIT12 = dict(VIT, depth=12)


def mmseg_vit(path):
    from mmseg.models.backbones import VisionTransformer
    vit = VisionTransformer(
        img_size=64, patch_size=8, embed_dims=32, num_layers=12, num_heads=2,
        mlp_ratio=4, out_indices=(5, 11), qkv_bias=True, patch_bias=True,
        norm_cfg=dict(type='LN', eps=1e-6), final_norm=True,
        interpolate_mode='bicubic',
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    vit.init_weights()
    vit.eval()  # mmseg's train() returns None
    return vit


def assert_mmseg_vit_loads_all(path, vit):
    converted = torch.load(str(path), map_location='cpu')
    converted = converted.get('state_dict', converted)
    assert set(converted) == set(vit.state_dict())
    for key, value in vit.state_dict().items():
        torch.testing.assert_close(value, converted[key].reshape(value.shape))


def test_augreg_npz_timm_and_mmseg(tmp_path):
    """AugReg ``.npz`` from ``init_cfg`` alone (timm's ``.npz`` reader), and
    into mmseg's ``VisionTransformer`` through mmseg's
    ``vitjax2mmseg.py``: both give the source ViT's features."""
    source = timm_source('vit_base_patch16_224', num_classes=5, **VIT12)
    npz = tmp_path / 'Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03.npz'
    big_vision_npz(source, npz)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(
            x, indices=[5, 11], norm=True, output_fmt='NCHW',
            intermediates_only=True)
    model = load('vit_base_patch16_224', npz, out_indices=(5, 11),
                 model_kwargs=dict(VIT12, num_classes=5))
    with torch.no_grad():
        for ours, theirs in zip(model(x), expected):
            torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert sorted(model.pretrained_report['on_purpose'][
        'classifier/pooling head']) == ['head/bias', 'head/kernel']

    converted = tmp_path / 'vit_mmseg.pth'
    run_converter('mmseg', 'vitjax2mmseg.py', npz, converted)
    vit = mmseg_vit(converted)
    assert_mmseg_vit_loads_all(converted, vit)
    with torch.no_grad():
        outs = vit(x)
    # mmseg applies its final norm to the last output only
    torch.testing.assert_close(outs[1], expected[1], atol=ATOL, rtol=0)


def test_timm_vit_into_mmseg_vit2mmseg(tmp_path):
    """A timm ViT file (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) into
    mmseg's ``VisionTransformer`` through mmseg's ``vit2mmseg.py``: every
    entry loads and the features equal timm's."""
    source = timm_source('vit_base_patch16_224', num_classes=5, **VIT12)
    src = tmp_path / 'vit_base_patch16_224.pth'
    torch.save(source.state_dict(), src)
    converted = tmp_path / 'vit_mmseg.pth'
    run_converter('mmseg', 'vit2mmseg.py', src, converted)
    vit = mmseg_vit(converted)
    assert_mmseg_vit_loads_all(converted, vit)  # the head is dropped
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_intermediates(
            x, indices=[5, 11], norm=True, output_fmt='NCHW',
            intermediates_only=True)
        outs = vit(x)
    torch.testing.assert_close(outs[1], expected[1], atol=ATOL, rtol=0)


SWIN = dict(img_size=112, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
            window_size=7)


def microsoft_swin(source) -> dict:
    """``swin_tiny_patch4_window7_224.pth`` (``{'model': ...}``) of the timm
    Swin ``source``, in the layout of microsoft/Swin-Transformer at
    f82860bfb5225915aca09c3227159ee9e1df874d, ``models/swin_transformer.py``:
    ``patch_embed.{proj, norm}``, ``layers.i.blocks.j.{norm1,
    attn.{relative_position_bias_table, relative_position_index (buffer),
    qkv, proj}, norm2, mlp.{fc1, fc2}}``, ``attn_mask`` buffers of the
    shifted blocks, ``layers.i.downsample.{reduction, norm}`` at the *end*
    of every stage but the last (timm's sit at the start of the next),
    ``norm``, ``head``."""
    import re
    sd = {}
    for key, value in source.state_dict().items():
        key = re.sub(r'^layers\.(\d+)\.downsample',
                     lambda m: f'layers.{int(m.group(1)) - 1}.downsample', key)
        sd[key.replace('head.fc.', 'head.')] = value
    for name, buffer in source.named_buffers():
        if name.endswith(('relative_position_index', 'attn_mask')):
            sd[name] = buffer
    return {'model': sd}


def swin_stage_outputs(source, x):
    """timm's stage outputs, each through a LayerNorm at its initial
    (identity) affine: mmdet/mmseg add one per output (``norm{i}``), which
    the Microsoft file does not have (they train from their init)."""
    with torch.no_grad():
        outs = source.forward_intermediates(
            x, indices=[0, 1], norm=False, output_fmt='NCHW',
            intermediates_only=True)
    return [
        torch.nn.functional.layer_norm(o.permute(0, 2, 3, 1),
                                       o.shape[1:2]).permute(0, 3, 1, 2)
        for o in outs
    ]


def test_swin_microsoft_release_mmdet_and_mmseg(tmp_path):
    """Microsoft's Swin file in mmdet's ``SwinTransformer`` from
    ``init_cfg`` (``convert_weights=True``, as mmdet's Swin configs set; the
    APLA detection config inherits it), and in mmseg's through mmseg's
    ``swin2mmseg.py``: all entries load (but the per-output ``norm{i}``
    that mmdet/mmseg add) and the stage outputs equal timm's Swin."""
    from mmdet.models.backbones import SwinTransformer as MMDetSwin
    from mmdet.models.backbones.swin import swin_converter
    from mmseg.models.backbones import SwinTransformer as MMSegSwin
    source = timm_source('swin_tiny_patch4_window7_224', num_classes=5,
                         **SWIN)
    path = tmp_path / 'swin_tiny_patch4_window7_224.pth'
    ckpt = microsoft_swin(source)
    torch.save(ckpt, path)
    arch = dict(embed_dims=32, depths=(2, 2), num_heads=(2, 4),
                strides=(4, 2), window_size=7, out_indices=(0, 1),
                pretrain_img_size=112)
    x = torch.randn(1, 3, 112, 112)
    expected = swin_stage_outputs(source, x)
    added = {f'norm{i}.{p}' for i in (0, 1) for p in ('weight', 'bias')}

    from mmengine.config import ConfigDict  # as a config gives init_cfg
    det = MMDetSwin(convert_weights=True, init_cfg=ConfigDict(
        type='Pretrained', checkpoint=str(path)), **arch)
    det.init_weights()
    converted = {k[len('backbone.'):]: v
                 for k, v in swin_converter(ckpt['model']).items()}
    assert set(det.state_dict()) - set(converted) == added
    assert {k.rsplit('.', 1)[-1] for k in set(converted) - set(
        det.state_dict())} == {'attn_mask', 'weight', 'bias'}
    seg_path = tmp_path / 'swin_mmseg.pth'
    run_converter('mmseg', 'swin2mmseg.py', path, seg_path)
    seg = MMSegSwin(init_cfg=ConfigDict(type='Pretrained',
                                        checkpoint=str(seg_path)), **arch)
    seg.init_weights()
    assert set(seg.state_dict()) - set(torch.load(str(seg_path))) == added
    with torch.no_grad():
        for backbone in (det, seg):
            backbone.eval()
            for ours, theirs in zip(backbone(x), expected):
                torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_anything_else_is_a_warning(tmp_path, log):
    """Entries missing from the file, and entries that match nothing and
    that no release layout explains, are warnings (and go to a PEFT run's
    load guard), never named as left out on purpose."""
    source = timm_source('vit_base_patch16_224', num_classes=0, **VIT)
    sd = {k: v for k, v in source.state_dict().items()
          if not k.startswith('blocks.1.mlp.')}
    sd['adapter.0.weight'] = torch.zeros(3)
    path = tmp_path / 'partial.pth'
    torch.save(sd, path)
    model = TimmViT('vit_base_patch16_224', model_kwargs=VIT,
                    init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    report = model.pretrained_report
    assert sorted(report['missing']) == sorted(
        f'blocks.1.mlp.{n}.{p}' for n in ('fc1', 'fc2')
        for p in ('weight', 'bias'))
    assert report['unrecognised'] == ['adapter.0.weight']
    assert not any('adapter' in k or 'mlp' in k
                   for keys in report['on_purpose'].values() for k in keys)
    warning = [m for m in log if 'did not load completely' in m]
    assert len(warning) == 1
    assert 'blocks.1.mlp.fc1.weight' in warning[0]
    assert 'adapter.0.weight' in warning[0]
