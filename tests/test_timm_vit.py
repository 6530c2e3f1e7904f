"""TimmViT: multi-level NCHW features from any timm ViT, local weights."""
import pytest
import torch
from safetensors.torch import save_file

from apla_mm.models import TimmViT

TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def tiny(**kwargs):
    kwargs.setdefault('model_kwargs', dict(TINY))
    return TimmViT('vit_base_patch16_224', **kwargs)


@pytest.mark.parametrize('size', [(64, 64), (96, 64), (128, 128), (40, 56)])
def test_output_shapes(size):
    model = tiny(out_indices=(0, 1, 3))
    outs = model(torch.zeros(2, 3, *size))
    assert len(outs) == 3
    for out in outs:
        assert out.shape == (2, 32, size[0] // 8, size[1] // 8)


def test_indices_prune_and_negative():
    model = tiny(out_indices=(-3, -2))
    assert model.out_indices == (1, 2)
    assert len(model.vit.blocks) == 3  # block 3 pruned
    assert isinstance(model.vit.norm, torch.nn.Identity)
    assert len(tiny(out_indices=(0, ), output_norm=True).vit.blocks) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match='out of range'):
        tiny(out_indices=(4, ))
    with pytest.raises(ValueError, match='repeat'):
        tiny(out_indices=(1, -3))
    with pytest.raises(TypeError, match='VisionTransformer'):
        TimmViT('resnet18')
    with pytest.raises(ValueError, match='not divisible by the patch size'):
        tiny()(torch.zeros(1, 3, 60, 64))


def test_frozen_has_no_trainable_parameters():
    model = tiny(frozen=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.vit.training


@pytest.mark.parametrize('fmt', ['pth', 'safetensors', 'wrapped'])
def test_pretrained_weights_equal_the_file(tmp_path, fmt):
    torch.manual_seed(0)
    source = tiny()
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    path = str(tmp_path / f'weights.{"pth" if fmt != "safetensors" else fmt}')
    if fmt == 'safetensors':
        save_file(state, path)
    elif fmt == 'wrapped':
        torch.save({'state_dict': {f'backbone.vit.{k}': v
                                   for k, v in state.items()}}, path)
    else:
        torch.save(state, path)
    prefix = 'backbone.vit.' if fmt == 'wrapped' else None
    torch.manual_seed(1)
    model = tiny(init_cfg=dict(
        type='Pretrained', checkpoint=path, prefix=prefix))
    assert not torch.equal(model.vit.blocks[0].attn.proj.weight,
                           state['blocks.0.attn.proj.weight'])
    model.init_weights()
    loaded = model.vit.state_dict()
    assert set(loaded) <= set(state)
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_pretrained_position_embedding_is_resampled(tmp_path):
    small = TimmViT('vit_base_patch16_224', model_kwargs=dict(
        TINY, img_size=32))
    path = str(tmp_path / 'w.pth')
    torch.save(small.vit.state_dict(), path)
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert model.vit.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(model.vit.blocks[1].attn.qkv.weight,
                       small.vit.blocks[1].attn.qkv.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match='local files only'):
        tiny(init_cfg=dict(type='Pretrained',
                           checkpoint='https://x/y.pth')).init_weights()
    with pytest.raises(FileNotFoundError, match='does not exist'):
        tiny(init_cfg=dict(type='Pretrained',
                           checkpoint=str(tmp_path / 'no.pth'))).init_weights()
    path = str(tmp_path / 'other.pth')
    torch.save({'encoder.layer.0.weight': torch.zeros(2)}, path)
    with pytest.raises(KeyError, match='prefix'):
        tiny(init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
    wrong = TimmViT('vit_base_patch16_224', model_kwargs=dict(
        TINY, embed_dim=16))
    torch.save(wrong.vit.state_dict(), path)
    with pytest.raises(ValueError, match='shape'):
        tiny(init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
