"""`import apla_mm` registers our modules where mmseg and mmdet find them."""
import pytest
from mmengine.registry import DefaultScope

import apla_mm

MODULES = {
    'MODELS': ['TimmViT'],
    'HOOKS': ['APLAHook'],
    'OPTIM_WRAPPERS': [
        'APLAOptimWrapper', 'APLAAmpOptimWrapper', 'PortableAmpOptimWrapper'
    ],
}


def test_version():
    assert isinstance(apla_mm.__version__, str)
    assert apla_mm.__version__.count('.') == 2


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_registered_names_resolve_from_both_scopes(scope):
    import importlib
    registry_module = importlib.import_module(f'{scope}.registry')
    for registry_name, names in MODULES.items():
        registry = getattr(registry_module, registry_name)
        for name in names:
            cls = registry.get(name)
            assert cls is not None, f'{name} not visible from {scope}'
            assert cls.__module__.startswith('apla_mm.')


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_build_backbone_in_scope(scope):
    import torch
    from mmengine.registry import MODELS
    cfg = dict(
        type='TimmViT',
        model_name='vit_base_patch16_224',
        out_indices=(0, ),
        model_kwargs=dict(
            img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=1))
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg)
    out = model(torch.zeros(1, 3, 32, 32))
    assert out[0].shape == (1, 16, 2, 2)


def test_hook_builds_from_mmdet_registry():
    from mmdet.registry import HOOKS
    hook = HOOKS.build(dict(type='APLAHook', rank=8, seed=3))
    assert hook.config.rank == 8 and hook.config.seed == 3
