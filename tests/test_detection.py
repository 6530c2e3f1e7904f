"""Mask R-CNN with a plain ViT + SimpleFPN (mmdet): configs, APLA, e2e."""
import copy
import functools
import glob
import os.path as osp
import pickle
import re

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook

import apla_mm  # noqa: F401
from apla_mm.engine import APLAHook
from apla_mm.peft.apla import APLAAdapter, APLAConfig
from apla_mm.testing import (REPO_ROOT, ParamSnapshotHook,
                             assert_apla_trained, build_runner, run_tool,
                             short_run_cfg)

CONFIGS = osp.join(REPO_ROOT, 'configs')
# the plain-ViT detectors (the Swin-T configs inherit mmdet's own and are
# covered by tests/test_configs.py and tests/test_dropin.py)
DET = sorted(
    p for p in glob.glob(osp.join(CONFIGS, 'finetune', '*mask-rcnn_*.py')) +
    glob.glob(osp.join(CONFIGS, 'apla', 'apla-*_mask-rcnn_*.py'))
    if '_swin-' not in p)
TOY_DET = [p for p in DET if '_toycoco' in p]
COCO_DET = [p for p in DET if p.endswith('_coco.py')]
APLA_DET = [p for p in DET if osp.basename(p).startswith('apla-')]
TIMM_APLA = 'apla/apla-r16_mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_' \
    'toycoco-128x128.py'
MMSEG_TINY = 'finetune/mask-rcnn_vit-tiny_simple-fpn_1xb8-200it_' \
    'toycoco-128x128.py'


def _rel(path: str) -> str:
    return osp.relpath(path, CONFIGS)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tiny detector's ops are small; one intra-op thread avoids OpenMP
    oversubscription on busy 2-core machines (up to 10x slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _load_cached(path: str) -> Config:
    return Config.fromfile(path)


def _load(path: str) -> Config:
    """``Config.fromfile`` once per file (mmdet:: bases are slow to read)."""
    return copy.deepcopy(_load_cached(path))


def _build(model_cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(model_cfg)


def _apla_rank(path: str):
    rank = re.match(r'apla-(r(\d+)|full)_', osp.basename(path))
    return 'full' if rank.group(1) == 'full' else int(rank.group(2))


# ------------------------------------------------------------------ configs
def test_det_config_set_is_complete():
    names = [osp.basename(p) for p in DET]
    assert len(TOY_DET) >= 8 and len(COCO_DET) >= 8
    for family in ('timm-vit-tiny', 'timm-vit-b16'):
        with_family = [n for n in names if f'_{family}_' in n]
        assert any(n.startswith('mask-rcnn_') for n in with_family)
        assert any(n.startswith('frozen_') for n in with_family)
        assert any(n.startswith('apla-full_') for n in with_family)
        assert len([n for n in with_family
                    if re.match(r'apla-r\d+_', n)]) >= 3
    assert any('_vit-tiny_' in n for n in names)  # mmseg ViT
    assert any('_vit-b16_' in n for n in names)


@pytest.mark.parametrize('path', DET, ids=_rel)
def test_det_config_loads(path):
    cfg = _load(path)
    name = osp.basename(path)
    assert cfg.default_scope == 'mmdet'
    assert 'apla_mm' in cfg.custom_imports.imports
    model = cfg.model
    assert model.type == 'MaskRCNN'
    assert model.neck.type == 'SimpleFPN' and model.neck.num_outs == 5
    assert model.data_preprocessor.pad_size_divisor == 32
    assert model.rpn_head.anchor_generator.strides == [4, 8, 16, 32, 64]
    assert model.roi_head.bbox_roi_extractor.featmap_strides == [
        4, 8, 16, 32
    ]
    if '_timm-vit-' in name:
        assert model.backbone.type == 'TimmViT'
        assert tuple(model.backbone.out_indices) == (-1, )
        assert model.backbone.get('frozen', False) == name.startswith(
            'frozen_')
    else:
        assert model.backbone.type == 'mmseg.VisionTransformer'
        assert model.backbone.out_indices == -1
    hooks = cfg.get('custom_hooks', [])
    if name.startswith('apla-'):
        assert [h.type for h in hooks] == ['APLAHook']
        assert hooks[0].rank == _apla_rank(path)
        assert cfg.optim_wrapper.type == 'OptimWrapper'
        assert cfg.optim_wrapper.paramwise_cfg.bias_decay_mult == 0.0
    else:
        assert not hooks and cfg.optim_wrapper.type == 'OptimWrapper'
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    metric = cfg.test_evaluator
    assert metric.type == 'CocoMetric'
    assert list(metric.metric) == ['bbox', 'segm']
    if name.endswith('_coco.py'):
        assert cfg.train_cfg.max_epochs == 12  # 1x
        assert cfg.param_scheduler[1].milestones == [8, 11]
        assert model.roi_head.bbox_head.num_classes == 80
        assert model.data_preprocessor.batch_augments[0].size == (1024, 1024)
        assert cfg.train_dataloader.dataset.pipeline[2].type == 'RandomResize'
        init = model.backbone.init_cfg
        assert init.type == 'Pretrained'
        assert init.checkpoint.startswith('pretrain/')  # a local file
        assert cfg.auto_scale_lr.base_batch_size == 16
    else:
        assert cfg.train_cfg.type == 'IterBasedTrainLoop'
        assert model.roi_head.bbox_head.num_classes == 4
        assert cfg.train_dataloader.dataset.data_root == 'data/toy_coco/'
        assert model.backbone.get('init_cfg') is None


@pytest.mark.parametrize('path', APLA_DET, ids=_rel)
def test_apla_det_config_is_finetune_config_plus_two_lines(path):
    cfg = _load(path).to_dict()
    base_name = osp.basename(path).split('_', 1)[1]
    base = _load(osp.join(CONFIGS, 'finetune', base_name)).to_dict()
    cfg.pop('custom_hooks')
    paramwise = cfg['optim_wrapper']['paramwise_cfg']
    # the official APLA recipe: no weight decay on biases and 1-D params
    assert paramwise.pop('bias_decay_mult') == 0.0
    assert paramwise.pop('flat_decay_mult') == 0.0
    assert cfg == base


# APLA configs build their finetune config's model (checked above).
FINETUNE_DET = [p for p in DET if p not in APLA_DET]


@pytest.mark.parametrize(
    'path',
    [
        p if '_toycoco' in p else pytest.param(p, marks=pytest.mark.slow)
        for p in FINETUNE_DET
    ],
    ids=_rel)
def test_det_config_builds(path):
    cfg = _load(path)
    model = _build(cfg.model)
    name = osp.basename(path)
    from apla_mm.models import SimpleFPN
    assert isinstance(model.neck, SimpleFPN)
    embed = 96 if '_toycoco' in name else 768
    assert model.neck.backbone_channel == embed
    params = {n: p for n, p in model.named_parameters()}
    w_o = [n for n in params if re.fullmatch(
        r'backbone\.(vit\.blocks\.\d+\.attn\.proj|'
        r'layers\.\d+\.attn\.attn\.out_proj)\.weight', n)]
    assert len(w_o) == (4 if '_toycoco' in name else 12)
    frozen = name.startswith('frozen_')
    assert all(p.requires_grad != frozen for n, p in params.items()
               if n.startswith('backbone.'))
    assert all(p.requires_grad for n, p in params.items()
               if not n.startswith('backbone.'))


# --------------------------------------------------- APLA on the detectors
def _det_batch(num: int, size: int = 128) -> dict:
    """Random images with two boxes/masks each, as a dataloader gives."""
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs, samples = [], []
    for _ in range(num):
        inputs.append(torch.randint(0, 255, (3, size, size),
                                    dtype=torch.uint8))
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(size, size), ori_shape=(size, size),
                scale_factor=(1., 1.)))
        gt = InstanceData()
        gt.bboxes = torch.tensor([[4., 6., 40., 44.], [50., 60., 100., 90.]])
        gt.labels = torch.tensor([1, 3])
        masks = np.zeros((2, size, size), np.uint8)
        masks[0, 6:44, 4:40] = 1
        masks[1, 60:90, 50:100] = 1
        gt.masks = BitmapMasks(masks, size, size)
        sample.gt_instances = gt
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def test_apla_on_mmseg_vit_detector_one_step():
    """mmseg's VisionTransformer from an mmdet config: APLA finds W_O
    (layers.N.attn.attn.out_proj inside nn.MultiheadAttention); one AdamW
    step with weight decay changes only the selected rows."""
    torch.manual_seed(0)
    model = _build(_load(osp.join(CONFIGS, MMSEG_TINY)).model)
    model.init_weights()
    adapter = APLAAdapter(model, APLAConfig(rank=8, seed=0))
    assert [layer.name for layer in adapter.layers] == [
        f'backbone.layers.{i}.attn.attn.out_proj' for i in range(4)
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.5)
    model.train()
    data = model.data_preprocessor(_det_batch(2), training=True)
    loss, _ = model.parse_losses(
        model.loss(data['inputs'], data['data_samples']))
    loss.backward()
    optimizer.step()
    adapter.sync_()
    after = model.state_dict()
    assert set(after) == set(before)  # plain keys, no APLA extras
    assert_apla_trained(before, after, adapter.indices())
    assert not torch.equal(before['neck.fpn_convs.0.conv.weight'],
                           after['neck.fpn_convs.0.conv.weight'])


class _MetricsHook(Hook):
    """Keep the metrics of the last validation."""

    def __init__(self) -> None:
        self.metrics = None

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics = metrics


def _toy_options(root: str) -> dict:
    ann = osp.join(root, 'annotations', 'instances_val.json')
    return {'val_evaluator.ann_file': ann, 'test_evaluator.ann_file': ann}


def _apla_hook(runner) -> APLAHook:
    return next(h for h in runner.hooks if isinstance(h, APLAHook))


def _run_tool(tool: str, *args: str) -> str:
    return run_tool([f'tools/{tool}.py', *args], env={'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
def test_apla_mask_rcnn_train_eval_resume_test(toy_coco_root, tmp_path):
    """APLA (r16) Mask R-CNN on toy COCO: train with bbox/segm evaluation,
    frozen entries bit-identical, meta in the checkpoint, resume, then
    tools/test.py with --out and --show-dir."""
    work = str(tmp_path / 'apla')
    cfg = short_run_cfg(
        TIMM_APLA, work, toy_coco_root, max_iters=4, val=True,
        checkpoint_interval=2, batch_size=4, **_toy_options(toy_coco_root))
    snapshot, metrics = ParamSnapshotHook(), _MetricsHook()
    runner = build_runner(cfg, snapshot, metrics)
    runner.train()

    # evaluation through mmdet's CocoMetric, boxes and masks
    assert metrics.metrics is not None
    for key in ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50',
                'coco/segm_mAP_50'):
        assert 0.0 <= metrics.metrics[key] <= 1.0, key

    # frozen backbone entries (unselected W_O rows and bias entries
    # included) are bit-identical; every selected row changed
    adapter = _apla_hook(runner).adapter
    indices = adapter.indices()
    assert sorted(indices) == [
        f'backbone.vit.blocks.{i}.attn.proj' for i in range(4)
    ]
    assert all(layer.rank == 16 for layer in adapter.layers)
    assert all(len(index) == 16 for index in indices.values())
    # weight and bias of 4 layers
    assert assert_apla_trained(snapshot.before, snapshot.after, indices) == 8
    head_keys = [k for k in snapshot.before if not k.startswith('backbone.')]
    moved_heads = [
        k for k in head_keys
        if not torch.equal(snapshot.before[k], snapshot.after[k])
    ]
    assert len(moved_heads) > 0.8 * len(head_keys)

    # the checkpoint is a plain Mask R-CNN state dict plus meta['apla_mm']
    ckpt = torch.load(osp.join(work, 'iter_4.pth'), map_location='cpu')
    meta = ckpt['meta']['apla_mm']
    assert meta['method'] == 'apla' and meta['config']['rank'] == 16
    assert {k: v['index'] for k, v in meta['layers'].items()} == \
        adapter.indices()
    assert set(ckpt['state_dict']) == set(snapshot.after)
    for key, value in snapshot.after.items():
        assert torch.equal(ckpt['state_dict'][key], value), key
    assert osp.isfile(osp.join(work, 'apla_indices.json'))

    # resuming at iteration 4 restores the selection and the state
    resume_cfg = short_run_cfg(
        TIMM_APLA, str(tmp_path / 'resumed'), toy_coco_root, max_iters=6,
        checkpoint_interval=2, batch_size=4, resume=True,
        load_from=osp.join(work, 'iter_4.pth'))
    resumed_snapshot = ParamSnapshotHook()
    resumed = build_runner(resume_cfg, resumed_snapshot)
    resumed.train()
    assert resumed.iter == 6
    assert _apla_hook(resumed).adapter.indices() == adapter.indices()
    for key, value in snapshot.after.items():
        assert torch.equal(resumed_snapshot.before[key], value), key
    assert_apla_trained(snapshot.before, resumed_snapshot.after,
                        _apla_hook(resumed).adapter.indices(),
                        rows_moved=False)
    ckpt6 = torch.load(
        osp.join(str(tmp_path / 'resumed'), 'iter_6.pth'), map_location='cpu')
    assert ckpt6['meta']['iter'] == 6
    assert ckpt6['meta']['apla_mm']['layers'] == meta['layers']

    # tools/test.py: metrics, --out pickle, --show-dir drawings
    out = str(tmp_path / 'dets.pkl')
    show = str(tmp_path / 'show')
    ann = osp.join(toy_coco_root, 'annotations', 'instances_val.json')
    log = _run_tool(
        'test', osp.join(CONFIGS, TIMM_APLA),
        osp.join(str(tmp_path / 'resumed'), 'iter_6.pth'), '--work-dir',
        str(tmp_path / 'test'), '--out', out, '--show-dir', show,
        '--cfg-options', f'test_dataloader.dataset.data_root={toy_coco_root}',
        f'test_evaluator.ann_file={ann}',
        'default_hooks.visualization.score_thr=0.0')
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    with open(out, 'rb') as f:
        dets = pickle.load(f)
    assert len(dets) == 8
    assert all('masks' in d['pred_instances'] for d in dets)
    drawn = sorted(glob.glob(osp.join(show, '*.jpg')))
    assert len(drawn) == 8
    n_with_preds = 0
    for path, det in zip(drawn, sorted(dets, key=lambda d: d['img_path'])):
        image = cv2.imread(path)
        source = cv2.imread(
            osp.join(toy_coco_root, 'val', osp.basename(path)))
        # ground truth | prediction, side by side
        assert image.shape == (128, 256, 3)
        if len(det['pred_instances']['scores']):
            n_with_preds += 1
            diff = np.abs(image[:, 128:].astype(int) - source.astype(int))
            assert diff.mean() > 1.0, path  # boxes/masks drawn on it
    assert n_with_preds > 0
