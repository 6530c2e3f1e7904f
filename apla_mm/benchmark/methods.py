"""Which methods are benchmarked and how each becomes a trainable model.

A *method* is a config: the task preset's full fine-tuning config changed
the way the repository's method configs change it (``custom_hooks`` with an
``APLAHook``/``LoRAHook``, a frozen backbone, or the META adapter's own
config), or a config file given on the command line. :class:`Trainee` builds
it outside a Runner exactly as training would: ``MODELS.build(cfg.model)``
in the config's default scope, the PEFT hook's ``build_adapter(model)``, an
AdamW over the parameters that require gradients, ``adapter.sync_()`` after
every step.

Method names (``--methods``):

========================  ===============================================
``full``                  full fine-tuning (the preset's base config)
``full-cp``               full fine-tuning, activation checkpointing of
                          the ViT blocks (timm's ``set_grad_checkpointing``)
``frozen``                frozen backbone: only neck and heads train
``apla-r<R>``             APLA, ``R`` output channels of every W_O
``apla-full``             APLA, all of W_O (``rank='full'``)
``apla-r<R>-cp``          APLA with ``with_cp=True`` (``apla-full-cp`` too)
``lora-r<R>``             LoRA rank ``R`` on qkv and W_O (alpha 16)
``meta``                  the META-style adapter config of the preset
========================  ===============================================

Memory options (:data:`OPTIONS`, :mod:`apla_mm.memory`) are ``+`` suffixes:
``+cp`` (= ``-cp``), ``+lean``, ``+heads``, ``+lp`` (needs AMP), ``+sdpa``
and ``+all`` (every option that applies; :func:`resolve_options`), e.g.
``apla-r64+cp+lean``, ``full+all``; they become a ``MemoryEfficientHook``
entry of ``custom_hooks``, applied by :class:`Trainee` through
:func:`apply_memory_hook`.
"""
import contextlib
import copy
import io
import os.path as osp
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config

from apla_mm.testing import REPO_ROOT

TASKS = ('seg', 'det', 'backbone')
MODEL_SIZES = ('tiny', 'vit-b16', 'vit-l16', 'dinov2-g14', 'tiny-mmseg',
               'vit-b16-mmseg')

_FT = 'configs/finetune/'
_META = 'configs/meta_adapter/'

#: (task, model) -> preset: base config (full fine-tuning), META config,
#: default input size and batch, default methods.
PRESETS: Dict[Tuple[str, str], dict] = {
    ('seg', 'tiny'): dict(
        base=_FT + 'upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        meta=_META + 'meta-adapter_upernet_timm-vit-tiny_1xb8-600it_toyseg'
        '-64x64.py',
        size=64, batch=2,
        methods=('full', 'frozen', 'apla-r8', 'apla-r16', 'apla-r32',
                 'apla-full', 'apla-r16-cp', 'lora-r8', 'meta')),
    ('seg', 'vit-b16'): dict(
        base=_FT + 'upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py',
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
        base=_FT + 'upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py',
        vit=dict(model_name='vit_large_patch16_224', embed_dim=1024,
                 out_indices=(5, 11, 17, 23)),
        size=512, batch=2,
        methods=('full', 'full+all', 'frozen', 'apla-r64', 'apla-r64+cp',
                 'apla-r64+all', 'lora-r16')),
    # DINOv2-g/14: 512x512 crops padded to 518x518 (37 x 37 patches of 14)
    ('seg', 'dinov2-g14'): dict(
        base=_FT + 'upernet_timm-vit-b16_mln_8xb2-160k_ade20k-512x512.py',
        vit=dict(model_name='vit_giant_patch14_dinov2', embed_dim=1536,
                 out_indices=(9, 19, 29, 39)),
        size=518, batch=2, crop=512,
        methods=('full', 'full+all', 'frozen', 'apla-r64', 'apla-r64+cp',
                 'apla-r64+all', 'lora-r16')),
    # mmseg's own VisionTransformer (nn.MultiheadAttention) instead of timm
    ('seg', 'tiny-mmseg'): dict(
        base=_FT + 'upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        size=64, batch=2,
        methods=('full', 'frozen', 'apla-r16', 'apla-full', 'apla-r16-cp',
                 'lora-r8')),
    ('seg', 'vit-b16-mmseg'): dict(
        base=_FT + 'upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py',
        size=512, batch=2,
        methods=('full', 'frozen', 'apla-r16', 'apla-r64', 'apla-r256',
                 'apla-full', 'apla-r64-cp', 'lora-r16')),
    ('det', 'tiny'): dict(
        base=_FT + 'mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco'
        '-128x128.py',
        meta=_META + 'meta-adapter_mask-rcnn_timm-vit-tiny_fpn_1xb8-200it_'
        'toycoco-128x128.py',
        size=128, batch=2,
        methods=('full', 'frozen', 'apla-r8', 'apla-r16', 'apla-r32',
                 'apla-full', 'apla-r16-cp', 'lora-r8', 'meta')),
    ('det', 'vit-b16'): dict(
        base=_FT + 'mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py',
        meta=_META + 'meta-adapter_mask-rcnn_timm-vit-b16_fpn_8xb2-lsj-1x_'
        'coco.py',
        size=512, batch=1,
        methods=('full', 'frozen', 'apla-r16', 'apla-r64', 'apla-r256',
                 'apla-full', 'apla-r64-cp', 'lora-r8', 'lora-r16', 'meta')),
    ('backbone', 'tiny'): dict(
        classifier=dict(
            model_name='vit_base_patch16_224', num_classes=10,
            model_kwargs=dict(patch_size=8, embed_dim=64, depth=4,
                              num_heads=2)),
        size=64, batch=8,
        methods=('full', 'frozen', 'apla-r8', 'apla-r16', 'apla-r32',
                 'apla-full', 'apla-r16-cp', 'lora-r8')),
    ('backbone', 'vit-b16'): dict(
        classifier=dict(model_name='vit_base_patch16_224', num_classes=1000),
        size=224, batch=8,
        methods=('full', 'frozen', 'apla-r16', 'apla-r64', 'apla-r256',
                 'apla-full', 'apla-r64-cp', 'lora-r8', 'lora-r16')),
}

_METHOD_RE = re.compile(
    r'^(?:(?P<full>full(?P<fullcp>-cp)?)|(?P<frozen>frozen)|(?P<meta>meta)|'
    r'apla-(?:r(?P<arank>\d+)|(?P<afull>full))(?P<acp>-cp)?|'
    r'lora-r(?P<lrank>\d+))$')

#: ``+option`` suffixes of a method name -> what they switch on (see the
#: module docstring and :mod:`apla_mm.memory`).
OPTIONS = {
    'cp': 'activation checkpointing of the ViT blocks',
    'lean': 'lean loss (only the low-resolution logits are kept; the '
    'upsampling and the loss are recomputed in backward)',
    'heads': 'activation checkpointing of the neck and the heads',
    'lp': 'frozen weights stored in the autocast dtype (needs AMP)',
    'sdpa': "fused attention (scaled_dot_product_attention) for mmseg's "
    'ViT',
    'all': 'every option that applies to the method and model',
}
_OPTION_LABELS = dict(cp='act. ckpt', lean='lean loss', heads='head ckpt',
                      lp='low-precision frozen', sdpa='SDPA')
_OPTION_ORDER = ('cp', 'lean', 'heads', 'lp', 'sdpa')


def _parse_options(name: str, suffixes: Sequence[str]) -> List[str]:
    options = []
    for opt in suffixes:
        if opt not in OPTIONS:
            raise ValueError(
                f'unknown option +{opt} in method {name!r}; options: '
                + ', '.join('+' + o for o in OPTIONS) + '.')
        if opt in options:
            raise ValueError(f'method {name!r} repeats +{opt}')
        options.append(opt)
    return options


def parse_method(name: str) -> dict:
    """``'apla-r64-cp'`` -> ``{'kind': 'apla', 'rank': 64, 'with_cp': True}``.

    Memory-option suffixes (``'apla-r64+cp+lean'``, ``'full+all'``) add
    ``'options'``: the list of options named (``+cp`` is the same as
    ``-cp``; ``+all`` stays ``'all'`` until :func:`resolve_options` knows
    the model and the precision).
    """
    base, *suffixes = name.split('+')
    m = _METHOD_RE.match(base)
    if m is None:
        raise ValueError(
            f'unknown method {name!r}; use full, full-cp, frozen, meta, '
            'apla-r<R>, apla-full, apla-r<R>-cp, apla-full-cp or lora-r<R>, '
            'optionally followed by memory options '
            + ''.join('+' + o for o in OPTIONS) + '.')
    options = _parse_options(name, suffixes)
    if m['full']:
        info = dict(kind='full', with_cp=bool(m['fullcp']))
    elif m['frozen']:
        info = dict(kind='frozen')
    elif m['meta']:
        info = dict(kind='meta')
    elif m['lrank']:
        info = dict(kind='lora', rank=int(m['lrank']))
    else:
        rank = 'full' if m['afull'] else int(m['arank'])
        if rank == 0:
            raise ValueError(f'{name}: rank must be > 0')
        info = dict(kind='apla', rank=rank, with_cp=bool(m['acp']))
    if options:
        if info['kind'] == 'meta':
            raise ValueError(f'{name}: the memory options apply to full '
                             'fine-tuning, frozen, APLA and LoRA, not META.')
        if 'cp' in options:
            if info['kind'] == 'frozen':
                raise ValueError(
                    f'{name}: a frozen backbone saves nothing for backward; '
                    'checkpointing it (+cp) changes nothing. Drop +cp.')
            if info.get('with_cp'):
                raise ValueError(f'{name}: -cp and +cp are the same option; '
                                 'give one.')
        if 'lp' in options and info['kind'] == 'full':
            raise ValueError(
                f'{name}: full fine-tuning has no frozen weights to store in '
                'low precision (+lp); use +lean/+heads/+cp, or +all.')
        info['options'] = options
    return info


def resolve_options(info: dict, amp: Optional[str] = None,
                    backbone_type: str = '') -> List[str]:
    """The concrete options of a parsed method: ``+all`` expanded for the
    method, model and precision (``lp`` only with AMP and frozen weights,
    ``cp`` not for a frozen backbone, ``sdpa`` only for mmseg's ViT, whose
    attention is not fused already), and ``-cp`` as ``cp``.

    Raises:
        ValueError: ``+lp`` without AMP.
    """
    options = list(info.get('options', ()))
    if info.get('with_cp'):
        options.append('cp')
    if 'all' in options:
        options.remove('all')
        wanted = ['lean', 'heads']
        if info['kind'] != 'frozen':
            wanted.append('cp')
        if amp and info['kind'] != 'full':
            wanted.append('lp')
        if backbone_type.endswith('VisionTransformer'):
            wanted.append('sdpa')
        options += [o for o in wanted if o not in options]
    if 'lp' in options and not amp:
        raise ValueError(
            '+lp stores the frozen weights in the autocast dtype and needs '
            'mixed precision: run with --amp bf16 (or fp16 on CUDA), or drop '
            '+lp.')
    return [o for o in _OPTION_ORDER if o in options]


def method_label(name: str) -> str:
    """Human-readable name of a preset method (config stems pass through)."""
    try:
        info = parse_method(name)
    except ValueError:
        return name
    kind = info['kind']
    options = list(info.get('options', ()))
    if info.get('with_cp'):
        options.insert(0, 'cp')
    suffix = ''.join(' + ' + ('all options' if o == 'all' else
                              _OPTION_LABELS[o]) for o in options)
    if kind == 'full':
        return 'Full fine-tuning' + suffix
    if kind == 'frozen':
        return 'Frozen backbone' + suffix
    if kind == 'meta':
        return 'META adapter'
    if kind == 'lora':
        return f"LoRA r={info['rank']} (qkv+proj)" + suffix
    rank = 'full W_O' if info['rank'] == 'full' else f"r={info['rank']}"
    return f'APLA {rank}' + suffix


@dataclass
class MethodSpec:
    """A method to benchmark: a name and the config that builds it."""
    name: str
    label: str
    task: str
    cfg: Config
    source: str = ''
    notes: List[str] = field(default_factory=list)


def task_of_cfg(cfg: Config) -> str:
    """``'seg'``, ``'det'`` or ``'backbone'`` for a config."""
    if cfg.model.get('type') == 'BenchViTClassifier':
        return 'backbone'
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        return 'seg'
    if scope == 'mmdet':
        return 'det'
    raise ValueError(f'cannot tell the task of a config with default_scope '
                     f'{scope!r} (expected mmseg or mmdet).')


def _abs(path: str) -> str:
    return path if osp.isabs(path) else osp.join(REPO_ROOT, path)


def classifier_cfg(classifier: dict) -> Config:
    """Config of the ``backbone`` preset's model (no config file needed)."""
    return Config(
        dict(
            custom_imports=dict(imports=['apla_mm'],
                                allow_failed_imports=False),
            default_scope=None,
            model=dict(type='BenchViTClassifier', **copy.deepcopy(
                classifier))))


def set_input_size(cfg: Config, task: str, size: int) -> None:
    """Make the model take ``size x size`` inputs and load no weights.

    Sets the ViT's ``img_size`` (so the position embedding is used as is,
    not resampled), the segmentor's data preprocessor ``size`` and the
    detector's fixed-size batch padding, and removes pretrained-weight
    loading (memory and time do not depend on the values).
    """
    model = cfg.model
    if 'pretrained' in model:
        model.pretrained = None
    backbone = model.get('backbone')
    targets = [backbone] if backbone is not None else []
    if task == 'backbone':
        targets = [model]
    for b in targets:
        if 'init_cfg' in b:
            b.init_cfg = None
        if b.get('type') in ('TimmViT', 'METAAdapterViT',
                             'BenchViTClassifier') or 'model_kwargs' in b:
            kwargs = b.get('model_kwargs') or {}
            kwargs['img_size'] = size
            b.model_kwargs = kwargs
        elif 'img_size' in b:
            b.img_size = (size, size)
    pre = model.get('data_preprocessor')
    if pre is not None:
        if task == 'seg':
            pre.size = (size, size)
        for aug in pre.get('batch_augments') or []:
            if 'size' in aug:
                aug['size'] = (size, size)


def _set_frozen(cfg: Config) -> None:
    backbone = cfg.model if cfg.model.get(
        'type') == 'BenchViTClassifier' else cfg.model.backbone
    btype = backbone.get('type', '')
    if btype in ('TimmViT', 'METAAdapterViT', 'BenchViTClassifier'):
        backbone.frozen = True
    elif btype.endswith('VisionTransformer'):
        backbone.frozen_exclude = []  # mmseg ViT: [] freezes everything
    else:
        raise ValueError(f'do not know how to freeze a {btype} backbone')


def _backbone_cfg(cfg: Config, task: str):
    return cfg.model if task == 'backbone' else cfg.model.backbone


AMP_DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}


def memory_hook(options: Sequence[str], amp: Optional[str] = None) -> dict:
    """The ``MemoryEfficientHook`` entry of ``options`` (model-side memory
    options of :mod:`apla_mm.memory`; ``cp`` is the backbone's own)."""
    return dict(
        type='MemoryEfficientHook',
        lean_loss='lean' in options,
        checkpoint_heads='heads' in options,
        frozen_dtype=AMP_DTYPES[amp] if 'lp' in options else None,
        fused_attention='sdpa' in options)


def apply_method(base: Config, name: str, task: str,
                 meta_config: Optional[str] = None,
                 amp: Optional[str] = None) -> Config:
    """The config of preset method ``name`` derived from ``base``.

    Args:
        amp (str, optional): ``'bf16'``/``'fp16'`` when the method trains
            under autocast (decides ``+lp`` and what ``+all`` means).
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f'amp must be None, bf16 or fp16, got {amp!r}')
    info = parse_method(name)
    kind = info['kind']
    if kind == 'meta':
        if meta_config is None:
            raise ValueError(f'the {task} preset has no META adapter config '
                             '(META is a dense-prediction adapter).')
        return Config.fromfile(_abs(meta_config))
    cfg = copy.deepcopy(base)
    backbone = _backbone_cfg(cfg, task)
    options = resolve_options(info, amp, backbone.get('type', ''))
    hooks = list(cfg.get('custom_hooks') or [])
    if kind == 'full':
        if 'cp' in options:
            backbone.with_cp = True
    elif kind == 'frozen':
        _set_frozen(cfg)
    elif kind == 'apla':
        hooks.append(
            dict(type='APLAHook', rank=info['rank'], seed=0,
                 with_cp='cp' in options))
    elif kind == 'lora':
        hooks.append(
            dict(type='LoRAHook', rank=info['rank'], alpha=16,
                 targets=('qkv', 'proj')))
        if 'cp' in options:
            backbone.with_cp = True
    if set(options) - {'cp'}:
        hooks.append(memory_hook(options, amp))
    cfg.custom_hooks = hooks
    return cfg


def scale_vit(cfg: Config, model_name: str, embed_dim: int,
              out_indices: Sequence[int]) -> None:
    """Swap the TimmViT of a UperNet/MLN config for another timm ViT: the
    backbone's name and output blocks, and the neck's and heads' input
    widths (``embed_dim``); the heads' own channels stay."""
    model = cfg.model
    backbone = model.backbone
    if backbone.get('type') != 'TimmViT':
        raise ValueError('scale_vit needs a TimmViT backbone, got '
                         f"{backbone.get('type')!r}")
    backbone.model_name = model_name
    backbone.out_indices = tuple(out_indices)
    n = len(out_indices)
    if model.get('neck') is not None:
        model.neck.in_channels = [embed_dim] * n
        model.neck.out_channels = embed_dim
    model.decode_head.in_channels = [embed_dim] * n
    aux = model.get('auxiliary_head')
    for head in (aux if isinstance(aux, list) else [aux] if aux else []):
        head.in_channels = embed_dim


def preset_base(task: str, model: str) -> Tuple[Config, str]:
    """The full fine-tuning config of a preset and its source."""
    preset = PRESETS[(task, model)]
    if task == 'backbone':
        return classifier_cfg(preset['classifier']), \
            f"BenchViTClassifier({preset['classifier']['model_name']})"
    base = Config.fromfile(_abs(preset['base']))
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
                'META is a dense-prediction adapter; the backbone preset '
                'has no META method (use the seg or det preset).')
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
    """One method per config file (name: the file's stem)."""
    specs = []
    for path in paths:
        cfg = Config.fromfile(path)
        task = task_of_cfg(cfg)
        if size:
            set_input_size(cfg, task, size)
        else:
            set_input_size(cfg, task, _config_size(cfg, task))
        name = osp.splitext(osp.basename(path))[0]
        if methods and name not in methods:
            continue
        specs.append(MethodSpec(name, name, task, cfg, source=path))
    tasks = {s.task for s in specs}
    if len(tasks) > 1:
        raise ValueError(f'--configs mixes tasks {sorted(tasks)}; compare '
                         'configs of one task at a time.')
    return specs


def _config_size(cfg: Config, task: str) -> int:
    """The input size a config trains at (data preprocessor / ViT)."""
    pre = cfg.model.get('data_preprocessor') or {}
    if pre.get('size'):
        return int(pre['size'][0])
    for aug in pre.get('batch_augments') or []:
        if aug.get('size'):
            return int(aug['size'][0])
    b = cfg.model.get('backbone') or cfg.model
    size = (b.get('model_kwargs') or {}).get('img_size') or b.get('img_size')
    if size is None:
        raise ValueError('cannot tell the input size of the config; pass '
                         '--size')
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------
# building and running one method
def _revert_sync_bn(model: nn.Module) -> nn.Module:
    from mmengine.model import revert_sync_batchnorm
    return revert_sync_batchnorm(model)


def _scope(cfg: Config):
    from mmengine.registry import DefaultScope
    return DefaultScope.overwrite_default_scope(cfg.get('default_scope'))


def import_custom(cfg: Config) -> None:
    imports = (cfg.get('custom_imports') or {}).get('imports') or []
    import importlib
    for name in imports:
        importlib.import_module(name)


def apply_memory_hook(model: nn.Module, hook_cfg: dict, adapter=None):
    """Apply a ``MemoryEfficientHook`` config entry to a built model as the
    hook would (:func:`apla_mm.memory.apply_memory_options`; the frozen
    weights are cast after the PEFT adapter took its trainable copies).

    Returns:
        The handle of the applied options.
    """
    from apla_mm.memory import MemoryConfig, apply_memory_options
    kwargs = {k: v for k, v in hook_cfg.items() if k != 'type'}
    config = MemoryConfig(**kwargs)
    handle = apply_memory_options(model, config)
    if config.frozen_dtype is not None:
        if adapter is not None and hasattr(adapter, 'refresh_rows_'):
            adapter.refresh_rows_()
        handle.cast_frozen_(config.frozen_dtype)
    return handle


class Trainee:
    """One method, built and ready to train (outside a Runner).

    Args:
        spec (MethodSpec): The method.
        batch_size (int): Images per step.
        size (int): Input height and width.
        device (str): ``'cpu'`` or ``'cuda'``.
        seed (int): Seed of the model initialisation and of every step.
        lr (float): AdamW learning rate (the value does not change memory
            or time). Defaults to 1e-4.
        amp (str, optional): ``'bf16'`` or ``'fp16'``: the forward pass and
            the loss run under ``torch.autocast`` of the device (fp16 with a
            ``GradScaler`` in :meth:`train_step`); weights, gradients and
            AdamW state stay float32 (mixed precision, as mmengine's
            ``AmpOptimWrapper``). Defaults to float32.
        abstract (bool): Build the model of fake tensors and run every step
            on them (:mod:`apla_mm.benchmark.abstract`): the memory account
            without allocating weights or computing anything. Defaults to
            False.
        sdpa (str): Scaled-dot-product attention kernel
            (:mod:`apla_mm.benchmark.sdpa`). Defaults to ``'auto'``.
    """

    def __init__(self, spec: MethodSpec, batch_size: int, size: int,
                 device: str = 'cpu', seed: int = 0,
                 lr: float = 1e-4, amp: Optional[str] = None,
                 abstract: bool = False, sdpa: str = 'auto') -> None:
        from mmengine.registry import HOOKS, MODELS

        from .abstract import (AbstractCompute, check_all_fake,
                               fake_parameters, new_fake_mode)
        from .data import make_batch
        from .sdpa import check_backend
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f'amp must be None, bf16 or fp16, got {amp!r}')
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.amp = amp
        self.abstract = abstract
        self.sdpa = check_backend(sdpa, device, abstract)
        if abstract and spec.task == 'det':
            raise ValueError(
                'the abstract account covers seg and backbone models: a '
                "detector's batch padding and proposal sampling depend on "
                'the data. Run the real account (drop --abstract).')
        if abstract and self.device.type != 'cpu':
            raise ValueError(
                'the abstract account runs on fake CPU tensors; use '
                "device='cpu' (the CUDA attention kernels are counted with "
                "sdpa='flash'/'efficient'/'cudnn').")
        self.fake_mode = new_fake_mode() if abstract else None
        building = (fake_parameters(self.fake_mode) if abstract else
                    contextlib.nullcontext())
        cfg = spec.cfg
        import_custom(cfg)
        self.memory_handle = None
        with _scope(cfg), building:
            torch.manual_seed(seed)
            model = MODELS.build(copy.deepcopy(cfg.model))
            model = _revert_sync_bn(model)
            self.adapter = None
            memory_cfg = None
            for hook_cfg in cfg.get('custom_hooks') or []:
                if hook_cfg.get('type') == 'MemoryEfficientHook':
                    memory_cfg = hook_cfg
                    continue
                hook = HOOKS.build(copy.deepcopy(hook_cfg))
                if hasattr(hook, 'build_adapter'):
                    if self.adapter is not None:
                        raise ValueError(f'{spec.name}: two PEFT hooks')
                    self.adapter = hook.build_adapter(model)
            if memory_cfg is not None:
                self.memory_handle = apply_memory_hook(model, memory_cfg,
                                                       self.adapter)
        if abstract:
            check_all_fake(model)
        else:
            model = model.to(self.device)
        self.model = model
        self.model.train()
        self.compute_context = (AbstractCompute(self.fake_mode, model)
                                if abstract else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        self.scaler = None
        if amp == 'fp16' and not abstract:
            self.scaler = torch.amp.GradScaler(self.device.type)
        with _scope(cfg), self.compute():
            self.inputs, self.data_samples = make_batch(
                spec.task, model, cfg, size, batch_size, seed)
        self.merged = False

    @property
    def substitutions(self) -> List[dict]:
        """Data-dependent operators the abstract run answered by assumption
        (:class:`~apla_mm.benchmark.abstract.DataDependentFallback`)."""
        if self.compute_context is None:
            return []
        return self.compute_context.substitutions

    @contextlib.contextmanager
    def compute(self):
        """The context of the forward/backward passes: the fake mode (with
        ``abstract``) and the attention kernel choice."""
        from .sdpa import SDPABackend
        with contextlib.ExitStack() as stack:
            if self.compute_context is not None:
                stack.enter_context(self.compute_context)
            stack.enter_context(SDPABackend(self.sdpa))
            yield

    def autocast(self):
        """``torch.autocast`` of the AMP dtype (a no-op in float32)."""
        if self.amp is None:
            return contextlib.nullcontext()
        dtype = getattr(torch, AMP_DTYPES[self.amp])
        return torch.autocast(self.device.type, dtype=dtype)

    # -- one training step, in pieces (the memory account hooks in) -----
    def forward_loss(self) -> torch.Tensor:
        """Forward and loss (under autocast with ``amp``); call inside
        :meth:`compute`."""
        torch.manual_seed(self.seed)
        with _scope(self.spec.cfg), self.autocast():
            losses = self.model(self.inputs, self.data_samples, mode='loss')
            loss, _ = self.model.parse_losses(losses)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled with fp16); inside :meth:`compute`.
        """
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """AdamW step (+ APLA row sync). With ``abstract`` outside the fake
        mode: AdamW's state follows its fake parameters, while its step
        counters stay real host scalars."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.adapter is not None:
            self.adapter.sync_()

    def train_step(self) -> float:
        """zero_grad, forward, backward, AdamW step (+ APLA sync)."""
        self.zero_grad()
        with self.compute():
            loss = self.forward_loss()
            self.backward(loss)
        self.optimizer_step()
        if self.abstract:
            return float('nan')
        return float(loss.detach())

    # -- inference --------------------------------------------------------
    def prepare_inference(self) -> None:
        """Eval mode, and the deployed form: LoRA factors merged into the
        weights (as ``LoRAHook`` does for validation/testing); APLA and the
        others run as they are (APLA's weights already hold the rows)."""
        self.zero_grad()
        self.model.eval()
        if self.adapter is not None and hasattr(self.adapter,
                                                'merge_and_unload') \
                and not self.merged:
            self.adapter.merge_and_unload()
            self.merged = True

    @torch.no_grad()
    def infer(self):
        with _scope(self.spec.cfg), self.compute(), self.autocast():
            return self.model(self.inputs, self.data_samples, mode='tensor')

    # -- parameters ---------------------------------------------------------
    def parameter_report(self) -> dict:
        """Total/trainable parameters and the size of the delta file."""
        from apla_mm.peft.report import count_parameters
        shadow = (self.adapter.shadow_parameters()
                  if self.adapter is not None else ())
        parts = count_parameters(self.model, shadow=shadow)
        total = parts['all']['total']
        trainable = parts['all']['trainable']
        if self.abstract:  # fake tensors cannot be serialised
            return dict(
                total=total,
                trainable=trainable,
                trainable_pct=100.0 * trainable / max(total, 1),
                parts={k: v for k, v in parts.items() if k != 'all'},
                delta_tensors=None, delta_tensor_bytes=None,
                delta_file_bytes=None)
        delta = self.delta_state_dict()
        buf = io.BytesIO()
        torch.save(delta, buf)
        return dict(
            total=total,
            trainable=trainable,
            trainable_pct=100.0 * trainable / max(total, 1),
            parts={k: v for k, v in parts.items() if k != 'all'},
            delta_tensors=len(delta['state_dict']),
            delta_tensor_bytes=sum(
                v.numel() * v.element_size()
                for v in delta['state_dict'].values()),
            delta_file_bytes=buf.getbuffer().nbytes)

    def delta_state_dict(self) -> dict:
        """What a delta file of this run holds.

        APLA and LoRA: :func:`apla_mm.peft.delta.export_delta` of a
        checkpoint of the model (rows / factors + every entry outside the
        frozen modules). Other methods: the trainable parameters and the
        buffers of modules with trainable parameters (the whole model for
        full fine-tuning).
        """
        state = {
            k: v.detach().cpu()
            for k, v in self.model.state_dict().items()
        }
        if self.adapter is not None and hasattr(self.adapter, 'meta') \
                and not self.merged:
            from apla_mm.peft.delta import export_delta
            if hasattr(self.adapter, 'sync_'):
                self.adapter.sync_()
                state = {
                    k: v.detach().cpu()
                    for k, v in self.model.state_dict().items()
                }
            return export_delta(
                dict(meta={'apla_mm': self.adapter.meta()},
                     state_dict=state))
        trainable = {
            n for n, p in self.model.named_parameters() if p.requires_grad
        }
        owners = {n.rsplit('.', 1)[0] if '.' in n else '' for n in trainable}
        delta = {}
        for key, value in state.items():
            owner = key.rsplit('.', 1)[0] if '.' in key else ''
            if key in trainable or owner in owners:
                delta[key] = value
        return dict(meta={}, state_dict=delta)
