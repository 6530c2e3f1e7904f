"""`import apla_mm` registers our modules where mmseg and mmdet find them."""
import importlib

import pytest
from mmengine import registry as root_registries
from mmengine.registry import DefaultScope

import apla_mm

#: everything `import apla_mm` registers, by mmengine root registry
MODULES = {
    'MODELS': ['LN2d', 'METAAdapterViT', 'PEFTModel', 'SimpleFPN', 'TimmViT'],
    'HOOKS': [
        'APLAHook', 'CheckpointCheckHook', 'LoRAHook', 'MemoryEfficientHook',
        'PEFTHook', 'SafeCheckpointHook', 'SegTestVisualizationHook'
    ],
    'OPTIM_WRAPPERS': [
        'APLAAmpOptimWrapper', 'APLAOptimWrapper', 'PortableAmpOptimWrapper'
    ],
    'STRATEGIES': ['PortableFSDPStrategy'],
}
#: registered only when imported on purpose (tests, tools/benchmark.py)
OPT_IN = ('apla_mm.testing', 'apla_mm.benchmark')


def test_version_is_the_installed_one():
    """``apla_mm.__version__`` (apla_mm/version.py, which setup.py reads) is
    a normalised PEP 440 version and the one the installed distribution
    carries."""
    from importlib.metadata import version

    from packaging.version import Version
    assert str(Version(apla_mm.__version__)) == apla_mm.__version__
    assert version('apla_mm') == apla_mm.__version__, (
        'installed metadata differs from apla_mm/version.py: reinstall '
        '(pip install -e .)')


def test_import_registers_exactly_our_modules():
    for registry_name in ('MODELS', 'HOOKS', 'OPTIM_WRAPPERS', 'STRATEGIES',
                          'DATASETS',
                          'METRICS', 'TRANSFORMS',
                          'OPTIM_WRAPPER_CONSTRUCTORS', 'PARAM_SCHEDULERS',
                          'LOOPS', 'VISUALIZERS'):
        registry = getattr(root_registries, registry_name)
        ours = sorted(
            name for name, cls in registry.module_dict.items()
            if cls.__module__.startswith('apla_mm.')
            and not cls.__module__.startswith(OPT_IN))
        assert ours == MODULES.get(registry_name, []), registry_name


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_registered_names_resolve_from_both_scopes(scope):
    registry_module = importlib.import_module(f'{scope}.registry')
    for registry_name, names in MODULES.items():
        # mmseg/mmdet have no STRATEGIES of their own: FlexibleRunner builds
        # strategies from mmengine's root registry
        registry = getattr(registry_module, registry_name,
                           getattr(root_registries, registry_name))
        for name in names:
            cls = registry.get(name)
            assert cls is not None, f'{name} not visible from {scope}'
            assert cls is getattr(root_registries,
                                  registry_name).module_dict[name]


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
