"""The shared PEFT contract: one base, one target grammar, picklable adapted
models, and a third method built from the contract alone."""
import copy
from dataclasses import dataclass, field
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn

from apla_mm.peft import (APLAAdapter, APLAConfig, BaseAdapter, LoRAAdapter,
                          LoRAConfig, PeftConfig, adapter_class)
from apla_mm.peft.base import AdaptedLayer
from apla_mm.peft.delta import export_delta, merge_delta
from apla_mm.peft.targets import Target, resolve_targets
from apla_mm.testing import saved_and_copied


class Segmentor(nn.Module):
    """A module-level (so picklable) backbone + head model."""

    def __init__(self, backbone: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(dim, 3, 1)

    def forward(self, x):
        return self.head(self.backbone(x)[-1])


def timm_segmentor(with_cp: bool = False, seed: int = 0) -> Segmentor:
    from apla_mm.models import TimmViT
    torch.manual_seed(seed)
    return Segmentor(
        TimmViT('vit_base_patch16_224', out_indices=(1, ), with_cp=with_cp,
                model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32,
                                  depth=2, num_heads=2)))


def mmseg_segmentor(with_cp: bool = False, seed: int = 0) -> Segmentor:
    from mmseg.models.backbones import VisionTransformer
    torch.manual_seed(seed)
    backbone = VisionTransformer(img_size=(32, 32), patch_size=8,
                                 embed_dims=32, num_layers=2, num_heads=2,
                                 out_indices=(1, ), with_cp=with_cp)
    backbone.init_weights()
    return Segmentor(backbone)


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32,
                       generator=torch.Generator().manual_seed(seed))


def _step(model: nn.Module, adapter: BaseAdapter, lr: float = 0.1) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    adapter.attach_optimizer(optimizer)
    model(_batch()).pow(2).mean().backward()
    optimizer.step()


# -- the contract --------------------------------------------------------------
def test_methods_are_registered_adapters():
    assert adapter_class('apla') is APLAAdapter
    assert adapter_class('lora') is LoRAAdapter
    assert issubclass(APLAAdapter, BaseAdapter)
    assert issubclass(APLAConfig, PeftConfig)
    with pytest.raises(ValueError, match=r"unknown PEFT method 'meta'.*apla"):
        adapter_class('meta')


def test_config_base_normalises_the_shared_fields():
    for config_class in (APLAConfig, LoRAConfig):
        config = config_class(targets='proj', frozen_modules='backbone')
        assert config.targets == ('proj', )
        assert config.frozen_modules == ('backbone', )
        data = config.to_dict()
        assert data['targets'] == ['proj'] and 'with_cp' not in data
        assert config_class.from_dict(data) == config
        with pytest.raises(TypeError, match='frozen_modules'):
            config_class(frozen_modules=())
        # a record of apla_mm 0.2 (with with_cp) still reads (resume)
        assert config_class.from_dict(dict(data, with_cp=True)) == config
        # hooks and PEFTModel: with_cp names its new home; typos are named
        with pytest.raises(TypeError, match='checkpoint_blocks=True'):
            config_class.from_kwargs('APLAHook', with_cp=True)
        with pytest.raises(TypeError, match=r"unknown argument\(s\) \['rnak'\]"):
            config_class.from_kwargs('APLAHook', rnak=4)


def test_resume_problems_name_the_differing_setting():
    model = timm_segmentor()
    adapter = LoRAAdapter(model, LoRAConfig(rank=4))
    assert adapter.resume_problems(adapter.meta()) == []
    other = copy.deepcopy(adapter.meta())
    other['config']['rank'] = 8
    assert adapter.resume_problems(other) == ['rank: checkpoint 8, config 4']
    apla = APLAAdapter(timm_segmentor(), APLAConfig(rank=4, seed=1))
    meta = apla.meta()
    meta['config']['seed'] = 2
    assert apla.resume_problems(meta) == ['seed: checkpoint 2, config 1']


# -- one target grammar --------------------------------------------------------
def test_shortcuts_mean_the_same_for_every_method():
    names = {}
    for method, config in (('apla', APLAConfig(rank=4, targets='proj')),
                           ('lora', LoRAConfig(rank=4, targets='proj'))):
        adapter = adapter_class(method)(timm_segmentor(), config)
        names[method] = [layer.name for layer in adapter.layers]
    assert names['apla'] == names['lora'] == [
        'backbone.vit.blocks.0.attn.proj', 'backbone.vit.blocks.1.attn.proj'
    ]
    # APLA's default is the 'proj' shortcut, also for APLA on other linears
    default = APLAAdapter(timm_segmentor(), APLAConfig(rank=4))
    assert [layer.name for layer in default.layers] == names['apla']
    qkv = APLAAdapter(timm_segmentor(), APLAConfig(rank=4, targets='qkv'))
    assert [layer.name for layer in qkv.layers] == [
        'backbone.vit.blocks.0.attn.qkv', 'backbone.vit.blocks.1.attn.qkv'
    ]
    assert resolve_targets(None, ('qkv', 'proj')) == resolve_targets(
        ['qkv', 'proj'])


def test_multihead_attention_weight_resolved_in_one_place():
    lora = LoRAAdapter(mmseg_segmentor(), LoRAConfig(rank=4, targets='qkv'))
    assert [layer.key for layer in lora.layers] == [
        'backbone.layers.0.attn.attn.in_proj_weight',
        'backbone.layers.1.attn.attn.in_proj_weight'
    ]
    with pytest.raises(TypeError, match='APLA adapts linear layers.*out_proj'):
        APLAAdapter(mmseg_segmentor(), APLAConfig(rank=4, targets='qkv'))


# -- whole-model pickling ------------------------------------------------------
@pytest.mark.parametrize('method', ['apla', 'lora'])
@pytest.mark.parametrize('build', [timm_segmentor, mmseg_segmentor])
def test_adapted_model_pickles_and_deepcopies(method, build):
    model = build()
    config = APLAConfig(rank=4) if method == 'apla' else LoRAConfig(rank=4)
    adapter = adapter_class(method)(model, config)
    _step(model, adapter)
    x = _batch(5)
    with torch.no_grad():
        expected = model(x)
    loaded, twin = saved_and_copied(model)
    for other in (loaded, twin):
        assert [type(m).__name__ for m in other.modules()] == \
            [type(m).__name__ for m in model.modules()]
        assert other.state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
    # the copy trains: its rows/factors still receive gradients
    twin(x).pow(2).mean().backward()
    trained = [p for p in twin.backbone.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


# -- a third method from the contract alone ------------------------------------
@dataclass
class BiasOnlyConfig(PeftConfig):
    """Train the biases of the targeted layers (BitFit-style), for the test."""
    targets: Tuple[str, ...] = ('qkv', 'proj')
    frozen_modules: Tuple[str, ...] = field(default=('backbone', ))


@dataclass
class BiasLayer(AdaptedLayer):

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [self.module.bias]


class BiasOnlyAdapter(BaseAdapter):
    method = 'test-bias-only'
    config_class = BiasOnlyConfig

    def _make_layer(self, target: Target) -> BiasLayer:
        return BiasLayer(target.name, target.module, target.param,
                         *target.shape)

    def _inject(self, layer: BiasLayer) -> None:
        layer.module.bias.requires_grad_(True)

    def _eject(self, layer: BiasLayer) -> None:
        layer.module.bias.requires_grad_(False)

    def replacements(self):
        return {}  # the biases train in place

    @classmethod
    def delta_entries(cls, meta):
        return {f'{name}.bias': None for name in meta['layers']}


def test_a_third_method_needs_only_the_contract():
    model = timm_segmentor()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = BiasOnlyAdapter(model, BiasOnlyConfig())
    assert adapter_class('test-bias-only') is BiasOnlyAdapter
    assert len(adapter.layers) == 4
    assert adapter.num_trainable() == 2 * (96 + 32)
    _step(model, adapter)
    trained = model.state_dict()
    delta = export_delta(dict(meta={'apla_mm': adapter.meta()},
                              state_dict=trained))
    assert sorted(k for k in delta['state_dict']
                  if k.startswith('backbone')) == sorted(
                      f'{layer.name}.bias' for layer in adapter.layers)
    merged = merge_delta(base_state, delta)
    assert merged.keys() == trained.keys()
    for key in trained:
        assert torch.equal(merged[key], trained[key]), key
    changed = [k for k in trained if k.startswith('backbone')
               and not torch.equal(trained[k], base_state[k])]
    assert sorted(changed) == sorted(f'{layer.name}.bias'
                                     for layer in adapter.layers)
    assert adapter.merge_and_unload() is model
    assert not any(p.requires_grad for p in model.backbone.parameters())
