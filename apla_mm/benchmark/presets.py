"""Task presets: the model, input size, batch and methods of each
``tools/benchmark.py TASK --model MODEL``, built into method specs.

A preset's methods are its full fine-tuning config (a shipped config, found
through :func:`apla_mm.utils.paths.config_path`, or the
``BenchViTClassifier`` of the ``backbone`` task) changed by
:func:`~.edits.apply_method`; :func:`config_methods` takes config files
instead, one method each.
"""
import copy
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

from mmengine.config import Config

from apla_mm.utils.cli import task_of
from apla_mm.utils.paths import config_path
from .edits import (CLASSIFIER, MODEL_TASKS, apply_method, config_size,
                    scale_vit, set_input_size)
from .specs import MethodSpec, method_label, parse_method

TASKS = ('seg', 'det', 'backbone')

_FT = 'configs/finetune/'
_META = 'configs/meta_adapter/'
_UPERNET_B16 = _FT + 'upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py'

#: Default methods of the tiny presets (``meta`` added for seg and det).
_TINY_METHODS = ('full', 'frozen', 'apla-r8', 'apla-r16', 'apla-r32',
                 'apla-full', 'apla-r16-cp', 'lora-r8')
#: Default methods of the ViT-B/16 presets (LoRA ranks and ``meta`` added
#: per preset).
_B16_METHODS = ('full', 'frozen', 'apla-r16', 'apla-r64', 'apla-r256',
                'apla-full', 'apla-r64-cp')
#: Default methods of the larger ViTs (memory only, abstract account).
_LARGE_METHODS = ('full', 'full+all', 'frozen', 'apla-r64', 'apla-r64+cp',
                  'apla-r64+all', 'lora-r16')

#: (task, model) -> preset: base config (full fine-tuning), META config,
#: default input size and batch, default methods.
PRESETS: Dict[Tuple[str, str], dict] = {
    ('seg', 'tiny'): dict(
        base=_FT + 'upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        meta=_META + 'meta-adapter_upernet_timm-vit-tiny_1xb8-600it_toyseg'
        '-64x64.py',
        size=64, batch=2,
        methods=_TINY_METHODS + ('meta', )),
    ('seg', 'vit-b16'): dict(
        base=_UPERNET_B16,
        meta=_META + 'meta-adapter_upernet_timm-vit-b16_8xb2-160k_ade20k'
        '-512x512.py',
        size=512, batch=2,
        methods=('full', 'full+all', 'frozen', 'apla-r16', 'apla-r64',
                 'apla-r256', 'apla-full', 'apla-r64-cp', 'apla-r64+all',
                 'lora-r8', 'lora-r16', 'meta')),
    # larger timm ViTs in the same UperNet + MLN model (every width follows
    # the backbone's; decode/aux head channels as in the ViT-B config);
    # memory only, by the abstract account (fake tensors)
    ('seg', 'vit-l16'): dict(
        base=_UPERNET_B16,
        vit=dict(model_name='vit_large_patch16_224', embed_dim=1024,
                 out_indices=(5, 11, 17, 23)),
        size=512, batch=2,
        methods=_LARGE_METHODS),
    # DINOv2-g/14: 512x512 crops padded to 518x518 (37 x 37 patches of 14)
    ('seg', 'dinov2-g14'): dict(
        base=_UPERNET_B16,
        vit=dict(model_name='vit_giant_patch14_dinov2', embed_dim=1536,
                 out_indices=(9, 19, 29, 39)),
        size=518, batch=2, crop=512,
        methods=_LARGE_METHODS),
    # mmseg's own VisionTransformer (nn.MultiheadAttention) instead of timm
    ('seg', 'tiny-mmseg'): dict(
        base=_FT + 'upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        size=64, batch=2,
        methods=('full', 'frozen', 'apla-r16', 'apla-full', 'apla-r16-cp',
                 'lora-r8')),
    ('seg', 'vit-b16-mmseg'): dict(
        base=_FT + 'upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py',
        size=512, batch=2,
        methods=_B16_METHODS + ('lora-r16', )),
    ('det', 'tiny'): dict(
        base=_FT + 'mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco'
        '-128x128.py',
        meta=_META + 'meta-adapter_mask-rcnn_timm-vit-tiny_fpn_1xb8-200it_'
        'toycoco-128x128.py',
        size=128, batch=2,
        methods=_TINY_METHODS + ('meta', )),
    ('det', 'vit-b16'): dict(
        base=_FT + 'mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py',
        meta=_META + 'meta-adapter_mask-rcnn_timm-vit-b16_fpn_8xb2-lsj-1x_'
        'coco.py',
        size=512, batch=1,
        methods=_B16_METHODS + ('lora-r8', 'lora-r16', 'meta')),
    ('backbone', 'tiny'): dict(
        classifier=dict(
            model_name='vit_base_patch16_224', num_classes=10,
            model_kwargs=dict(patch_size=8, embed_dim=64, depth=4,
                              num_heads=2)),
        size=64, batch=8,
        methods=_TINY_METHODS),
    ('backbone', 'vit-b16'): dict(
        classifier=dict(model_name='vit_base_patch16_224', num_classes=1000),
        size=224, batch=8,
        methods=_B16_METHODS + ('lora-r8', 'lora-r16')),
}


def classifier_cfg(classifier: dict) -> Config:
    """Config of the ``backbone`` preset's model (no config file needed)."""
    return Config(
        dict(
            custom_imports=dict(imports=['apla_mm'],
                                allow_failed_imports=False),
            default_scope=None,
            model=dict(type=CLASSIFIER, **copy.deepcopy(
                classifier))))


def preset_base(task: str, model: str) -> Tuple[Config, str]:
    """The full fine-tuning config of a preset and its source."""
    preset = PRESETS[(task, model)]
    if task == 'backbone':
        return classifier_cfg(preset['classifier']), \
            f"{CLASSIFIER}({preset['classifier']['model_name']})"
    base = Config.fromfile(config_path(preset['base']))
    source = preset['base']
    if preset.get('vit'):
        scale_vit(base, **preset['vit'])
        source += f" with {preset['vit']['model_name']}"
    return base, source


def preset_methods(task: str, model: str, size: Optional[int] = None,
                   methods: Optional[Sequence[str]] = None,
                   amp: Optional[str] = None
                   ) -> Tuple[List[MethodSpec], dict]:
    """Method specs of a task preset.

    Args:
        task (str): ``'seg'``, ``'det'`` or ``'backbone'``.
        model (str): The preset's model (a key of :data:`PRESETS`).
        size (int, optional): Input size (default: the preset's).
        methods (Sequence[str], optional): Method names (default: the
            preset's list).
        amp (str, optional): ``'bf16'``/``'fp16'``: the methods train under
            autocast (``+lp``, ``+all``; see :func:`resolve_options`).

    Returns:
        tuple: the specs and the preset (with ``size``/``batch`` defaults).
    """
    if task not in TASKS:
        raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    if (task, model) not in PRESETS:
        raise ValueError(
            f'no {task} preset for model {model!r}; presets: '
            f'{sorted(m for t, m in PRESETS if t == task)}')
    preset = PRESETS[(task, model)]
    size = size or preset['size']
    names = list(methods) if methods else list(preset['methods'])
    base, source = preset_base(task, model)
    specs = []
    for name in names:
        info = parse_method(name)
        if info['kind'] == 'meta' and not preset.get('meta'):
            raise ValueError(
                f'the {task}/{model} preset has no META adapter config '
                '(META is a dense-prediction adapter, configured for the '
                "ViT-B/16 and tiny seg and det presets); drop 'meta' from "
                '--methods.')
        cfg = apply_method(base, name, task, preset.get('meta'), amp=amp)
        set_input_size(cfg, task, size)
        specs.append(
            MethodSpec(
                name=name,
                label=method_label(name),
                task=task,
                cfg=cfg,
                source=(preset['meta'] if info['kind'] == 'meta' else
                        source)))
    return specs, dict(preset, size=size)


def config_methods(paths: Sequence[str], size: Optional[int] = None,
                   methods: Optional[Sequence[str]] = None
                   ) -> List[MethodSpec]:
    """One method per config file (name: the file's stem).

    Args:
        paths (Sequence[str]): Config files of one task.
        size (int, optional): Input size (default: each config's).
        methods (Sequence[str], optional): Keep only these stems.

    Raises:
        ValueError: The configs are of several tasks.
    """
    specs = []
    for path in paths:
        cfg = Config.fromfile(path)
        task = task_of(cfg, MODEL_TASKS)
        if size:
            set_input_size(cfg, task, size)
        else:
            set_input_size(cfg, task, config_size(cfg, task))
        name = osp.splitext(osp.basename(path))[0]
        if methods and name not in methods:
            continue
        specs.append(MethodSpec(name, name, task, cfg, source=path))
    tasks = {s.task for s in specs}
    if len(tasks) > 1:
        raise ValueError(f'--configs mixes tasks {sorted(tasks)}; compare '
                         'configs of one task at a time.')
    return specs
