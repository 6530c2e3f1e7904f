"""Config edits: a method, an input size, a model width, applied to a
config the way the repository's own configs differ from each other.

The edits are keyed on the backbone's type: apla_mm's ViTs
(:data:`VIT_TYPES`: the ``frozen`` flag, timm ``model_kwargs``)
and mmseg's ``VisionTransformer`` (``frozen_exclude``, ``img_size``).
"""
import copy
from typing import Optional, Sequence

from mmengine.config import Config

from apla_mm.utils.paths import config_path
from .specs import AMP_DTYPES, check_amp, parse_method, resolve_options

#: The model type of the ``backbone`` preset (a ViT and a linear head).
CLASSIFIER = 'BenchViTClassifier'
#: Backbones built by apla_mm around a timm ViT.
VIT_TYPES = ('TimmViT', 'METAAdapterViT', CLASSIFIER)
#: Model types whose task is not their ``default_scope``'s
#: (:func:`apla_mm.utils.cli.task_of`).
MODEL_TASKS = {CLASSIFIER: 'backbone'}


def backbone_cfg(cfg: Config, task: str):
    """The backbone entry of a config (the whole model for ``backbone``)."""
    return cfg.model if task == 'backbone' else cfg.model.backbone


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
        if b.get('type') in VIT_TYPES or 'model_kwargs' in b:
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


def set_frozen(cfg: Config) -> None:
    """Freeze the backbone of a config the way its type is frozen: the
    ``frozen`` flag of apla_mm's ViTs, an empty ``frozen_exclude`` of
    mmseg's ``VisionTransformer``.

    Raises:
        ValueError: Another backbone type.
    """
    backbone = cfg.model if cfg.model.get(
        'type') == CLASSIFIER else cfg.model.backbone
    btype = backbone.get('type', '')
    if btype in VIT_TYPES:
        backbone.frozen = True
    elif btype.endswith('VisionTransformer'):
        backbone.frozen_exclude = []  # mmseg ViT: [] freezes everything
    else:
        raise ValueError(f'do not know how to freeze a {btype} backbone')


def memory_hook(options: Sequence[str], amp: Optional[str] = None) -> dict:
    """The ``MemoryEfficientHook`` entry of ``options`` (the memory options
    of :mod:`apla_mm.memory`, the same for every method; ``cp`` is
    ``checkpoint_blocks``)."""
    return dict(
        type='MemoryEfficientHook',
        lean_loss='lean' in options,
        checkpoint_blocks='cp' in options,
        checkpoint_heads='heads' in options,
        frozen_dtype=AMP_DTYPES[amp] if 'lp' in options else None,
        fused_attention='sdpa' in options)


def apply_method(base: Config, name: str, task: str,
                 meta_config: Optional[str] = None,
                 amp: Optional[str] = None) -> Config:
    """The config of preset method ``name`` derived from ``base``.

    Args:
        base (Config): The full fine-tuning config.
        name (str): The method (:func:`~.specs.parse_method`).
        task (str): ``'seg'``, ``'det'`` or ``'backbone'``.
        meta_config (str, optional): The preset's META adapter config
            (``meta``), relative to the configs root.
        amp (str, optional): ``'bf16'``/``'fp16'`` when the method trains
            under autocast (decides ``+lp`` and what ``+all`` means).
    """
    check_amp(amp)
    info = parse_method(name)
    kind = info['kind']
    if kind == 'meta':
        if meta_config is None:
            raise ValueError(f'the {task} preset has no META adapter config '
                             '(META is a dense-prediction adapter).')
        return Config.fromfile(config_path(meta_config))
    cfg = copy.deepcopy(base)
    backbone = backbone_cfg(cfg, task)
    options = resolve_options(info, amp, backbone.get('type', ''))
    hooks = list(cfg.get('custom_hooks') or [])
    if kind == 'frozen':
        set_frozen(cfg)
    elif kind == 'apla':
        hooks.append(dict(type='APLAHook', rank=info['rank'], seed=0))
    elif kind == 'lora':
        hooks.append(
            dict(type='LoRAHook', rank=info['rank'], alpha=16,
                 targets=('qkv', 'proj')))
    if options:
        # one mechanism for every method, block checkpointing included
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


def strip_method(cfg: Config, task: str) -> Config:
    """The full fine-tuning config behind a method config: PEFT and memory
    hooks removed, the backbone trainable and not checkpointed."""
    cfg = copy.deepcopy(cfg)
    hooks = [
        h for h in (cfg.get('custom_hooks') or []) if h.get('type') not in (
            'APLAHook', 'LoRAHook', 'MemoryEfficientHook')
    ]
    cfg.custom_hooks = hooks
    backbone = backbone_cfg(cfg, task)
    for key in ('frozen', 'with_cp'):
        if backbone.get(key):
            backbone[key] = False
    if backbone.get('frozen_exclude') == []:
        backbone.pop('frozen_exclude')
    return cfg


def config_size(cfg: Config, task: str) -> int:
    """The input size a config trains at (data preprocessor / ViT).

    Raises:
        ValueError: The config does not tell.
    """
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
