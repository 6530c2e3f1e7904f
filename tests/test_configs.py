"""Every shipped config loads and is what its file name says; toy configs
build to the exact parameter count of their definition; APLA configs are
drop-ins.

A config's name follows OpenMMLab's convention,
``[{method}_]{model}_{backbone}[_{neck}]_{schedule}_{dataset}``, where the
method prefix is ``apla-r{rank}`` / ``apla-full`` (optionally ``-cp``,
``-lean``, ``-mixin``, ``-toybase``), ``lora-r{rank}``, ``meta-adapter`` or
``frozen``, the schedule ``[{gpus}xb{batch}-][lsj-|ms-crop-]{160k|600it|1x}``
and the dataset ``{ade20k|coco|toyseg|toycoco}[-{h}x{w}]``. Each part is
checked against the loaded config, so a name that no table below knows fails.
"""
import glob
import os.path as osp
import re
from typing import Dict, NamedTuple, Optional, Union

import pytest
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

import apla_mm  # noqa: F401
from apla_mm.testing import REPO_ROOT

CONFIGS = osp.join(REPO_ROOT, 'configs')
# configs/recipes/ holds templates for a user's own data (their dataset
# token names no shipped set): tests/test_recipes.py runs them end to end.
ALL = sorted(
    p for p in glob.glob(osp.join(CONFIGS, '**', '*.py'), recursive=True)
    if '/_base_/' not in p and '/recipes/' not in p)
TOY = [p for p in ALL if '_toy' in osp.basename(p)]
APLA = [
    p for p in ALL if osp.basename(p).startswith('apla-') and 'mixin' not in p
    and '-lean_' not in p and '-toybase_' not in p
]

PEFT_METHOD = re.compile(r'^(?P<method>apla|lora)-(?P<rank>r\d+|full)'
                         r'(?:-(?P<variant>cp|lean|mixin|toybase))?$')
SCHEDULE = re.compile(r'^(?:(?P<gpus>\d+)xb(?P<batch>\d+)-)?'
                      r'(?:(?P<aug>lsj|ms-crop)-)?'
                      r'(?:(?P<kiters>\d+)k|(?P<iters>\d+)it|(?P<epochs>1x))$')
DATASET = re.compile(r'^(?P<data>ade20k|coco|toyseg|toycoco)'
                     r'(?:-(?P<h>\d+)x(?P<w>\d+))?$')

#: method prefix -> folder under configs/
FOLDERS = {
    'apla': 'apla',
    'lora': 'lora',
    'meta-adapter': 'meta_adapter',
    'frozen': 'finetune',
    None: 'finetune'
}
#: model token -> (segmentor / detector type, decode head type)
MODEL_TYPES = {
    'upernet': ('EncoderDecoder', 'UPerHead'),
    'setr': ('EncoderDecoder', 'SETRUPHead'),
    'mask-rcnn': ('MaskRCNN', None),
}
#: backbone token -> (type, timm model name, embed dim, depth, patch size)
BACKBONES = {
    'timm-vit-b16': ('TimmViT', 'vit_base_patch16_224', 768, 12, 16),
    'timm-vit-tiny': ('TimmViT', 'vit_base_patch16_224', None, 4, None),
    'timm-dinov2-vit-b14': ('TimmViT', 'vit_base_patch14_dinov2', 768, 12, 14),
    'timm-eva02-b14': ('TimmViT', 'eva02_base_patch14_224', 768, 12, 14),
    'vit-b16': ('VisionTransformer', None, 768, 12, 16),
    'vit-l': ('VisionTransformer', None, 1024, 24, 16),
    'vit-tiny': ('VisionTransformer', None, None, 4, None),
    'swin-t-p4-w7': ('SwinTransformer', None, 96, None, 4),
}
#: neck token (none: no neck) -> neck type
NECKS = {
    'mln': 'MultiLevelNeck',
    'simple-fpn': 'SimpleFPN',
    'fpn': 'FPN',
    'pup': None,
    None: None
}
#: dataset token -> (dataset type, data root)
DATASETS = {
    'ade20k': ('ADE20KDataset', 'data/ade/ADEChallengeData2016'),
    'coco': ('CocoDataset', 'data/coco/'),
    'toyseg': ('BaseSegDataset', 'data/toy_seg'),
    'toycoco': ('CocoDataset', 'data/toy_coco/'),
}
# defaults of what a backbone config leaves out: timm's model definitions
# and mmseg's VisionTransformer / mmdet's SwinTransformer arguments
TIMM_DEFAULTS = {
    'vit_base_patch16_224': dict(embed_dim=768, depth=12, patch_size=16),
    'vit_base_patch14_dinov2': dict(embed_dim=768, depth=12, patch_size=14),
    'eva02_base_patch14_224': dict(embed_dim=768, depth=12, patch_size=14),
}
MM_DEFAULTS = dict(embed_dims=768, num_layers=12, patch_size=16)
SWIN_DEFAULTS = dict(embed_dims=96, patch_size=4, window_size=7)


class ConfigName(NamedTuple):
    folder: str
    method: Optional[str]  # 'apla', 'lora', 'meta-adapter', 'frozen'
    rank: Optional[Union[int, str]]  # an int or 'full' for APLA/LoRA
    variant: Optional[str]
    base: str  # the name without the method prefix
    model: str
    backbone: str
    neck: Optional[str]
    schedule: re.Match
    dataset: re.Match


def parse_name(path: str) -> ConfigName:
    """Split a config's file name into the parts of the convention."""
    folder = osp.basename(osp.dirname(path))
    name = osp.basename(path)[:-len('.py')]
    first, rest = name.split('_', 1)
    peft = PEFT_METHOD.match(first)
    method = rank = variant = None
    base = name
    if peft:
        method, variant, base = peft['method'], peft['variant'], rest
        rank = 'full' if peft['rank'] == 'full' else int(peft['rank'][1:])
    elif first in ('meta-adapter', 'frozen'):
        method, base = first, rest
    parts = base.split('_')
    assert 4 <= len(parts) <= 5, f'{name}: unexpected parts {parts}'
    schedule, dataset = SCHEDULE.match(parts[-2]), DATASET.match(parts[-1])
    assert schedule and dataset, f'{name}: schedule or dataset not known'
    return ConfigName(folder, method, rank, variant, base, parts[0], parts[1],
                      parts[2] if len(parts) == 5 else None, schedule, dataset)


def _rel(path):
    return osp.relpath(path, CONFIGS)


def _root_dataset(loader_cfg):
    dataset = loader_cfg['dataset']
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    return dataset


def _sizes(cfg):
    """(h, w) sizes the model and the training pipeline use."""
    sizes = {tuple(cfg.model.get('data_preprocessor', {}).get('size') or ())}
    for step in _root_dataset(cfg.train_dataloader).get('pipeline', []):
        for key in ('scale', 'crop_size'):
            if isinstance(step.get(key), (tuple, list)):
                sizes.add(tuple(step[key]))
    return sizes


def _peft_hooks(cfg):
    return [
        h for h in cfg.get('custom_hooks', [])
        if h['type'] in ('APLAHook', 'LoRAHook')
    ]


def test_configs_are_found_in_every_folder():
    folders = {osp.basename(osp.dirname(p)) for p in ALL}
    assert folders == set(FOLDERS.values())
    assert {osp.basename(osp.dirname(p)) for p in TOY} == folders


@pytest.mark.parametrize('path', ALL, ids=_rel)
def test_config_loads_and_is_what_its_name_says(path):
    cfg = Config.fromfile(path)
    name = parse_name(path)
    assert cfg.default_scope == ('mmdet'
                                 if name.model == 'mask-rcnn' else 'mmseg')
    assert name.folder == FOLDERS[name.method]
    model, backbone = cfg.model, cfg.model.backbone

    # method: the hook and its rank, or a frozen backbone
    hooks = _peft_hooks(cfg)
    if name.method in ('apla', 'lora'):
        hook_type = 'APLAHook' if name.method == 'apla' else 'LoRAHook'
        assert [(h['type'], h['rank'])
                for h in hooks] == [(hook_type, name.rank)]
        assert 'apla_mm' in cfg.custom_imports.imports
        # every PEFT config has its full fine-tuning base
        assert osp.isfile(osp.join(CONFIGS, 'finetune', name.base + '.py'))
    else:
        assert hooks == []
    if hooks and hooks[0]['type'] == 'APLAHook':
        # mmseg's/mmdet's --amp need the stock wrapper type
        assert cfg.optim_wrapper.get(
            'type', 'OptimWrapper') in ('OptimWrapper', 'AmpOptimWrapper',
                                        'PortableAmpOptimWrapper')
    memory_hooks = [
        h for h in cfg.get('custom_hooks', [])
        if h['type'] == 'MemoryEfficientHook'
    ]
    assert bool(memory_hooks) == (name.variant in ('lean', 'cp'))
    assert any(h.get('checkpoint_blocks') for h in memory_hooks) == (
        name.variant == 'cp')
    if name.variant == 'toybase':
        assert backbone.init_cfg.checkpoint.startswith('data/toy_pretrained/')
    frozen = (backbone.get('frozen') is True
              or backbone.get('frozen_exclude') == [])
    assert frozen == (name.method in ('frozen', 'meta-adapter'))
    if name.method == 'frozen':
        assert osp.isfile(osp.join(CONFIGS, 'finetune', name.base + '.py'))

    # model, backbone, neck
    model_type, head_type = MODEL_TYPES[name.model]
    assert model.type == model_type
    if head_type:
        assert model.decode_head.type == head_type
    else:
        assert model.roi_head.mask_head is not None
    bb_type, timm_name, dim, depth, patch = BACKBONES[name.backbone]
    if name.method == 'meta-adapter':
        assert bb_type == 'TimmViT'
        bb_type = 'METAAdapterViT'
    assert backbone.type.split('.')[-1] == bb_type
    if bb_type in ('TimmViT', 'METAAdapterViT'):
        assert backbone.model_name == timm_name
        kwargs = {
            **TIMM_DEFAULTS[timm_name],
            **backbone.get('model_kwargs', {})
        }
        found = (kwargs['embed_dim'], kwargs['depth'], kwargs['patch_size'])
    elif bb_type == 'VisionTransformer':
        kwargs = {**MM_DEFAULTS, **backbone}
        found = (kwargs['embed_dims'], kwargs['num_layers'],
                 kwargs['patch_size'])
    else:
        kwargs = {**SWIN_DEFAULTS, **backbone}
        found = (kwargs['embed_dims'], None, kwargs['patch_size'])
        assert kwargs['window_size'] == 7
    expected = (dim, depth, patch)
    assert all(e is None or e == f for e, f in zip(expected, found)), found
    if dim is None:  # the tiny toy ViTs
        assert found[0] <= 96
    neck_type = NECKS[name.neck]
    assert (model.get('neck') or {}).get('type') == neck_type

    # schedule and batch size
    schedule = name.schedule
    if schedule['batch']:
        assert cfg.train_dataloader.batch_size == int(schedule['batch'])
    if schedule['epochs']:
        assert cfg.train_cfg.type == 'EpochBasedTrainLoop'
        assert cfg.train_cfg.max_epochs == 12
    else:
        iters = (int(schedule['kiters']) *
                 1000 if schedule['kiters'] else int(schedule['iters']))
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert cfg.train_cfg.max_iters == iters
    if schedule['aug'] == 'lsj':
        assert (1024, 1024) in _sizes(cfg)

    # dataset and input size
    dataset_type, data_root = DATASETS[name.dataset['data']]
    for loader in ('train_dataloader', 'val_dataloader'):
        dataset = _root_dataset(cfg[loader])
        assert dataset.type == dataset_type
        assert dataset.data_root == data_root
    if name.dataset['h']:
        size = (int(name.dataset['h']), int(name.dataset['w']))
        assert size in _sizes(cfg), _sizes(cfg)


def vit_params(dim: int,
               depth: int,
               patch: int,
               img: int,
               patch_bias: bool,
               mlp_ratio: int = 4) -> int:
    """Parameters of a plain ViT without final norm or head.

    A ``patch x patch`` stride-``patch`` conv from RGB, a class token, one
    position embedding per patch and for the class token, and ``depth``
    pre-norm blocks of two LayerNorms, the qkv and output projections and a
    two-layer MLP, all with biases.
    """
    tokens = (img // patch)**2 + 1
    embed = 3 * patch * patch * dim + dim * patch_bias + dim + tokens * dim
    block = (2 * 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim +
             2 * mlp_ratio * dim * dim + mlp_ratio * dim + dim)
    return embed + depth * block


#: toy ViTs: (embed dim, depth, patch, image size)
TOY_VITS = {'toyseg': (64, 4, 8, 64), 'toycoco': (96, 4, 16, 128)}
#: exact parameter counts of the toy models' other parts, by the base name
#: without the backbone token (MultiLevelNeck of 4 x (1x1 + 3x3) convs on
#: 64 channels: 4 * (64*64 + 64) + 4 * (9*64*64 + 64) = 164,352)
TOY_PARTS: Dict[str, Dict[str, int]] = {
    'upernet_mln_1xb8-600it_toyseg-64x64':
    dict(neck=164_352, decode_head=472_901, auxiliary_head=18_661),
    'mask-rcnn_simple-fpn_1xb8-200it_toycoco-128x128':
    dict(neck=207_064, rpn_head=37_903, roi_head=964_953),
    # META-style adapter: SPM, injectors, extractors, gamma, pyramid norms
    'meta-adapter_upernet_1xb8-600it_toyseg-64x64':
    dict(adapter=358_224, decode_head=472_901, auxiliary_head=18_661),
    'meta-adapter_mask-rcnn_fpn_1xb8-200it_toycoco-128x128':
    dict(adapter=688_976, neck=172_544, rpn_head=37_903, roi_head=964_953),
}


@pytest.mark.parametrize('path', TOY, ids=_rel)
def test_toy_config_builds_to_its_exact_parameter_count(path):
    """PEFT and frozen variants build the very model of their base (the
    hooks adapt it at run time): a tiny ViT (``vit_params``) plus the parts
    in ``TOY_PARTS``."""
    cfg = Config.fromfile(path)
    name = parse_name(path)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    counts: Dict[str, int] = {}
    for key, p in model.named_parameters():
        part = key.split('.')[0]
        if part == 'backbone' and name.method == 'meta-adapter':
            part = 'vit' if key.startswith('backbone.vit.') else 'adapter'
        counts[part] = counts.get(part, 0) + p.numel()
    dim, depth, patch, img = TOY_VITS[name.dataset['data']]
    timm = name.backbone.startswith('timm-')
    vit = vit_params(dim, depth, patch, img, patch_bias=timm)
    key = '_'.join(([name.method] if name.method == 'meta-adapter' else []) +
                   [name.model] + ([name.neck] if name.neck else []) +
                   [name.schedule.string, name.dataset.string])
    expected = dict(TOY_PARTS[key])
    expected['vit' if name.method == 'meta-adapter' else 'backbone'] = vit
    assert counts == expected


@pytest.mark.parametrize('path', APLA, ids=_rel)
def test_apla_config_is_base_config_plus_two_lines(path):
    """An APLA config differs from its full fine-tuning base only by
    custom_imports, custom_hooks and the official no-decay recipe for biases
    and 1-D parameters."""
    cfg = Config.fromfile(path)
    name = osp.basename(path).split('_', 1)[1]
    base_path = osp.join(CONFIGS, 'finetune', name)
    base = Config.fromfile(base_path)
    cfg_dict, base_dict = cfg.to_dict(), base.to_dict()
    for key in ('custom_imports', 'custom_hooks'):
        cfg_dict.pop(key, None)
        base_dict.pop(key, None)
    # Swin: mmdet's added output norms are not in Microsoft's file; the
    # config says so to the load guard, and nothing else
    allowed = cfg_dict.pop('allow_partial_pretrained', None)
    assert allowed in (None, [r'backbone\.norm[0-3]\..*'])
    assert (allowed is not None) == ('swin' in name)
    paramwise = cfg_dict['optim_wrapper']['paramwise_cfg']
    assert paramwise.pop('bias_decay_mult') == 0.0
    assert paramwise.pop('flat_decay_mult') == 0.0
    base_paramwise = base_dict['optim_wrapper'].setdefault('paramwise_cfg', {})
    assert 'bias_decay_mult' not in base_paramwise
    if not paramwise:
        cfg_dict['optim_wrapper'].pop('paramwise_cfg')
        if not base_paramwise:
            base_dict['optim_wrapper'].pop('paramwise_cfg')
    assert cfg_dict == base_dict


def test_mixin_equals_explicit_lines():
    explicit = Config.fromfile(
        osp.join(CONFIGS, 'apla',
                 'apla-r64_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py'))
    mixin = Config.fromfile(
        osp.join(
            CONFIGS, 'apla',
            'apla-r64-mixin_upernet_vit-b16_mln_8xb2-160k_ade20k-512x512'
            '.py'))
    assert explicit.to_dict() == mixin.to_dict()
