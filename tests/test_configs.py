"""Every shipped config loads; toy configs build; APLA configs are drop-ins."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import apla_mm  # noqa: F401
from apla_mm.testing import REPO_ROOT

ALL = sorted(
    p for p in glob.glob(osp.join(REPO_ROOT, 'configs', '**', '*.py'),
                         recursive=True) if '/_base_/' not in p)
TOY = [p for p in ALL if '_toy' in osp.basename(p)]
APLA = [p for p in ALL if osp.basename(p).startswith('apla-')
        and 'mixin' not in p and '-lean_' not in p and '-toybase_' not in p]


def _rel(path):
    return osp.relpath(path, osp.join(REPO_ROOT, 'configs'))


def test_there_are_configs():
    assert len(ALL) >= 20 and len(TOY) >= 10


@pytest.mark.parametrize('path', ALL, ids=_rel)
def test_config_loads(path):
    cfg = Config.fromfile(path)
    assert cfg.default_scope in ('mmseg', 'mmdet')
    assert 'model' in cfg and 'train_dataloader' in cfg
    hooks = [h['type'] for h in cfg.get('custom_hooks', [])]
    if 'APLAHook' in hooks:
        # mmseg's/mmdet's --amp need the stock wrapper type
        assert cfg.optim_wrapper.get('type', 'OptimWrapper') in (
            'OptimWrapper', 'AmpOptimWrapper', 'PortableAmpOptimWrapper')
        assert 'apla_mm' in cfg.custom_imports.imports


@pytest.mark.parametrize('path', TOY, ids=_rel)
def test_toy_config_builds(path):
    cfg = Config.fromfile(path)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


@pytest.mark.parametrize('path', APLA, ids=_rel)
def test_apla_config_is_base_config_plus_two_lines(path):
    """An APLA config differs from its full fine-tuning base only by
    custom_imports, custom_hooks and the official no-decay recipe for biases
    and 1-D parameters."""
    cfg = Config.fromfile(path)
    name = osp.basename(path).split('_', 1)[1]
    base_path = osp.join(REPO_ROOT, 'configs', 'finetune', name)
    base = Config.fromfile(base_path)
    cfg_dict, base_dict = cfg.to_dict(), base.to_dict()
    for key in ('custom_imports', 'custom_hooks'):
        cfg_dict.pop(key, None)
        base_dict.pop(key, None)
    paramwise = cfg_dict['optim_wrapper']['paramwise_cfg']
    assert paramwise.pop('bias_decay_mult') == 0.0
    assert paramwise.pop('flat_decay_mult') == 0.0
    base_paramwise = base_dict['optim_wrapper'].setdefault(
        'paramwise_cfg', {})
    assert 'bias_decay_mult' not in base_paramwise
    if not paramwise:
        cfg_dict['optim_wrapper'].pop('paramwise_cfg')
        if not base_paramwise:
            base_dict['optim_wrapper'].pop('paramwise_cfg')
    assert cfg_dict == base_dict


def test_mixin_equals_explicit_lines():
    explicit = Config.fromfile(
        osp.join(REPO_ROOT, 'configs', 'apla',
                 'apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py'))
    mixin = Config.fromfile(
        osp.join(REPO_ROOT, 'configs', 'apla',
                 'apla-r64-mixin_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512'
                 '.py'))
    assert explicit.to_dict() == mixin.to_dict()
