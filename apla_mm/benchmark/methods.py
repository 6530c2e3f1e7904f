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
"""
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
MODEL_SIZES = ('tiny', 'vit-b16', 'tiny-mmseg', 'vit-b16-mmseg')

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
        size=256, batch=2,
        methods=('full', 'frozen', 'apla-r16', 'apla-r64', 'apla-r256',
                 'apla-full', 'apla-r64-cp', 'lora-r8', 'lora-r16', 'meta')),
    # mmseg's own VisionTransformer (nn.MultiheadAttention) instead of timm
    ('seg', 'tiny-mmseg'): dict(
        base=_FT + 'upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        size=64, batch=2,
        methods=('full', 'frozen', 'apla-r16', 'apla-full', 'apla-r16-cp',
                 'lora-r8')),
    ('seg', 'vit-b16-mmseg'): dict(
        base=_FT + 'upernet_vit-b16_mln_8xb2-160k_ade20k-512x512.py',
        size=256, batch=2,
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


def parse_method(name: str) -> dict:
    """``'apla-r64-cp'`` -> ``{'kind': 'apla', 'rank': 64, 'with_cp': True}``.
    """
    m = _METHOD_RE.match(name)
    if m is None:
        raise ValueError(
            f'unknown method {name!r}; use full, full-cp, frozen, meta, '
            'apla-r<R>, apla-full, apla-r<R>-cp, apla-full-cp or lora-r<R>.')
    if m['full']:
        return dict(kind='full', with_cp=bool(m['fullcp']))
    if m['frozen']:
        return dict(kind='frozen')
    if m['meta']:
        return dict(kind='meta')
    if m['lrank']:
        return dict(kind='lora', rank=int(m['lrank']))
    rank = 'full' if m['afull'] else int(m['arank'])
    if rank == 0:
        raise ValueError(f'{name}: rank must be > 0')
    return dict(kind='apla', rank=rank, with_cp=bool(m['acp']))


def method_label(name: str) -> str:
    """Human-readable name of a preset method (config stems pass through)."""
    try:
        info = parse_method(name)
    except ValueError:
        return name
    kind = info['kind']
    if kind == 'full':
        return 'Full fine-tuning' + (' + act. ckpt' if info['with_cp'] else
                                     '')
    if kind == 'frozen':
        return 'Frozen backbone'
    if kind == 'meta':
        return 'META adapter'
    if kind == 'lora':
        return f"LoRA r={info['rank']} (qkv+proj)"
    rank = 'full W_O' if info['rank'] == 'full' else f"r={info['rank']}"
    return f'APLA {rank}' + (' + act. ckpt' if info['with_cp'] else '')


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


def apply_method(base: Config, name: str, task: str,
                 meta_config: Optional[str] = None) -> Config:
    """The config of preset method ``name`` derived from ``base``."""
    info = parse_method(name)
    kind = info['kind']
    if kind == 'meta':
        if meta_config is None:
            raise ValueError(f'the {task} preset has no META adapter config '
                             '(META is a dense-prediction adapter).')
        return Config.fromfile(_abs(meta_config))
    cfg = copy.deepcopy(base)
    if kind == 'full':
        if info['with_cp']:
            target = (cfg.model if task == 'backbone' else cfg.model.backbone)
            target.with_cp = True
    elif kind == 'frozen':
        _set_frozen(cfg)
    elif kind == 'apla':
        cfg.custom_hooks = [
            dict(type='APLAHook', rank=info['rank'], seed=0,
                 with_cp=info['with_cp'])
        ]
        if 'optim_wrapper' in cfg:
            cfg.optim_wrapper.type = 'APLAOptimWrapper'
    elif kind == 'lora':
        cfg.custom_hooks = [
            dict(type='LoRAHook', rank=info['rank'], alpha=16,
                 targets=('qkv', 'proj'))
        ]
    return cfg


def preset_methods(task: str, model: str, size: Optional[int] = None,
                   methods: Optional[Sequence[str]] = None
                   ) -> Tuple[List[MethodSpec], dict]:
    """Method specs of a task preset.

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
    if task == 'backbone':
        base = classifier_cfg(preset['classifier'])
        source = f"BenchViTClassifier({preset['classifier']['model_name']})"
    else:
        base = Config.fromfile(_abs(preset['base']))
        source = preset['base']
    specs = []
    for name in names:
        info = parse_method(name)
        if info['kind'] == 'meta' and not preset.get('meta'):
            raise ValueError(
                'META is a dense-prediction adapter; the backbone preset '
                'has no META method (use the seg or det preset).')
        cfg = apply_method(base, name, task, preset.get('meta'))
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
    """

    def __init__(self, spec: MethodSpec, batch_size: int, size: int,
                 device: str = 'cpu', seed: int = 0,
                 lr: float = 1e-4) -> None:
        from mmengine.registry import HOOKS, MODELS

        from .data import make_batch
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        cfg = spec.cfg
        import_custom(cfg)
        with _scope(cfg):
            torch.manual_seed(seed)
            model = MODELS.build(copy.deepcopy(cfg.model))
            model = _revert_sync_bn(model)
            self.adapter = None
            for hook_cfg in cfg.get('custom_hooks') or []:
                hook = HOOKS.build(copy.deepcopy(hook_cfg))
                if hasattr(hook, 'build_adapter'):
                    if self.adapter is not None:
                        raise ValueError(f'{spec.name}: two PEFT hooks')
                    self.adapter = hook.build_adapter(model)
        self.model = model.to(self.device)
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        with _scope(cfg):
            self.inputs, self.data_samples = make_batch(
                spec.task, model, cfg, size, batch_size, seed)
        self.merged = False

    # -- one training step, in pieces (the memory account hooks in) -----
    def forward_loss(self) -> torch.Tensor:
        torch.manual_seed(self.seed)
        with _scope(self.spec.cfg):
            losses = self.model(self.inputs, self.data_samples, mode='loss')
            loss, _ = self.model.parse_losses(losses)
        return loss

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        self.optimizer.step()
        if self.adapter is not None:
            self.adapter.sync_()

    def train_step(self) -> float:
        """zero_grad, forward, backward, AdamW step (+ APLA sync)."""
        self.zero_grad()
        loss = self.forward_loss()
        loss.backward()
        self.optimizer_step()
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
        with _scope(self.spec.cfg):
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
