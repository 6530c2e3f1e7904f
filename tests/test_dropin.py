"""The two-line APLA drop-in on configs apla_mm did not write.

Each case inherits a **stock** mmseg/mmdet config (``mmseg::``/``mmdet::``),
shrinks it to CPU size (64-d, 2-4 layers, 64-128 px, the toy data) and adds
exactly the README's two lines::

    custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
    custom_hooks = [dict(type='APLAHook', rank=R, seed=0)]

and checks, after a few iterations with the config's own optimizer wrapper
and constructor: every frozen entry bit-identical, every selected row changed,
and the trainable count ``sum_l r_l * (in_l + 1)`` + neck/heads, which is also
exactly what the optimizer holds.
"""
import copy
import glob
import os.path as osp
from unittest import mock

import pytest
import torch
from mmengine.config import Config

from apla_mm.compat import cpu_autocast_attention_guard, load_weights_only
from apla_mm.engine import APLAHook
from apla_mm.peft.utils import unwrap_model
from apla_mm.testing import (REPO_ROOT, ParamSnapshotHook,
                             assert_apla_trained, build_runner, repo_config,
                             run_tool, short_run_cfg)

DROP_IN = """_base_ = [{base!r}]
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank={rank!r}, seed=0)]
"""

_SEG_VIT = dict(
    img_size=(64, 64), patch_size=8, embed_dims=64, num_layers=4,
    num_heads=2, init_cfg=None)
_UPER = dict(
    neck=dict(in_channels=[64] * 4, out_channels=64),
    decode_head=dict(in_channels=[64] * 4, channels=32, num_classes=5),
    auxiliary_head=dict(in_channels=64, channels=16, num_classes=5))


def _timm(name: str, size: int, **kwargs) -> dict:
    """Stock UperNet-ViT with its backbone replaced by a tiny TimmViT."""
    return dict(
        model=dict(
            pretrained=None,
            data_preprocessor=dict(size=None, size_divisor=size),
            backbone=dict(
                _delete_=True, type='TimmViT', model_name=name,
                out_indices=(0, 1),
                model_kwargs=dict(
                    img_size=size, depth=2, embed_dim=64, num_heads=2,
                    **kwargs)),
            neck=dict(in_channels=[64] * 2, out_channels=64, scales=[2, 1]),
            decode_head=dict(
                in_channels=[64] * 2, in_index=[0, 1], channels=32,
                num_classes=5),
            auxiliary_head=dict(
                in_channels=64, in_index=1, channels=16, num_classes=5)),
        custom_imports=dict(imports=['apla_mm'],
                            allow_failed_imports=False))


_UPERNET_VIT = 'mmseg::vit/vit_vit-b16_mln_upernet_8xb2-160k_ade20k-512x512.py'
#: name -> (stock config, task, rank, overrides merged into it)
CASES = {
    'mmseg-upernet-vit': (_UPERNET_VIT, 'seg', 16, dict(
        model=dict(pretrained=None,
                   backbone=dict(_SEG_VIT, out_indices=(0, 1, 2, 3)),
                   **_UPER))),
    'mmseg-setr-pup': (
        'mmseg::setr/setr_vit-l_pup_8xb2-160k_ade20k-512x512.py', 'seg', 16,
        dict(model=dict(
            backbone=dict(_SEG_VIT, out_indices=(0, 1, 2, 3)),
            decode_head=dict(in_channels=64, channels=16, num_classes=5,
                             num_convs=2, up_scale=2),
            auxiliary_head=[
                dict(type='SETRUPHead', in_channels=64, channels=16,
                     in_index=i, num_classes=5, num_convs=1,
                     norm_cfg=dict(type='BN', requires_grad=True),
                     loss_decode=dict(type='CrossEntropyLoss',
                                      loss_weight=0.4))
                for i in (0, 1)
            ]))),
    'mmseg-mae-layer-decay': (
        'mmseg::mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py', 'seg',
        16, dict(
            model=dict(
                pretrained=None,
                backbone=dict(img_size=(64, 64), patch_size=8, embed_dims=64,
                              num_layers=4, num_heads=2,
                              out_indices=[0, 1, 2, 3]),
                neck=dict(embed_dim=64),
                **{k: v for k, v in _UPER.items() if k != 'neck'}),
            optim_wrapper=dict(paramwise_cfg=dict(num_layers=4)))),
    'timm-deit': (_UPERNET_VIT, 'seg', 16, _timm('deit_tiny_patch16_224', 64)),
    'timm-dinov2-reg4': (_UPERNET_VIT, 'seg', 16,
                         _timm('vit_small_patch14_reg4_dinov2', 14)),
    'timm-eva02': (_UPERNET_VIT, 'seg', 16,
                   _timm('eva02_tiny_patch14_224', 14)),
    'timm-sam': (_UPERNET_VIT, 'seg', 16, _timm(
        'samvit_base_patch16', 64, global_attn_indexes=(1, ),
        window_size=4)),
    # rank 0.25: 8, 16, 32, 64 of the stages' 32, 64, 128, 256 channels
    'mmdet-swin-mask-rcnn': (
        'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', 'det', 0.25,
        dict(model=dict(
            backbone=dict(embed_dims=32, depths=[1, 1, 1, 1],
                          num_heads=[1, 2, 4, 8], window_size=4,
                          drop_path_rate=0.0, init_cfg=None),
            neck=dict(in_channels=[32, 64, 128, 256], out_channels=32),
            rpn_head=dict(in_channels=32, feat_channels=32),
            roi_head=dict(
                bbox_roi_extractor=dict(out_channels=32),
                bbox_head=dict(in_channels=32, fc_out_channels=64,
                               num_classes=4),
                mask_roi_extractor=dict(out_channels=32),
                mask_head=dict(in_channels=32, conv_out_channels=32,
                               num_classes=4))))),
}

_TOY_DATA = {
    'seg': osp.join(REPO_ROOT, 'configs/_base_/datasets/toy_seg.py'),
    'det': osp.join(REPO_ROOT, 'configs/_base_/datasets/toy_coco_instance.py'),
}


def shrunk_stock_config(stock: str, task: str, overrides: dict,
                        data_root: str, out_dir: str) -> str:
    """Write the stock config, shrunk and pointed at the toy data, to
    ``out_dir/stock_base.py`` and return its path."""
    src = osp.join(out_dir, 'stock_src.py')
    with open(src, 'w') as f:
        f.write(f'_base_ = [{stock!r}]\n')
    cfg = Config.fromfile(src)
    cfg.merge_from_dict(copy.deepcopy(overrides))
    toy = Config.fromfile(_TOY_DATA[task])
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        cfg[key] = copy.deepcopy(toy[key])
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[key].dataset.data_root = data_root
    if task == 'seg':
        cfg.model.test_cfg = dict(mode='whole')
        if cfg.model.data_preprocessor.get('size') is not None:
            cfg.model.data_preprocessor.size = (64, 64)
    else:
        for key in ('val_evaluator', 'test_evaluator'):
            cfg[key].ann_file = osp.join(data_root,
                                         'annotations/instances_val.json')
    # two iterations, a checkpoint at the end, no validation in training
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2,
                         val_interval=100)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0,
                                by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook',
                                        by_epoch=False, interval=2)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=1,
                                    log_metric_by_epoch=False)
    cfg.log_processor = dict(by_epoch=False)
    base = osp.join(out_dir, 'stock_base.py')
    cfg.dump(base)
    return base


def write_drop_in(base: str, rank, out_dir: str) -> str:
    path = osp.join(out_dir, 'apla_drop_in.py')
    with open(path, 'w') as f:
        f.write(DROP_IN.format(base=base, rank=rank))
    return path


def check_apla_run(runner, snapshot: ParamSnapshotHook) -> None:
    """Frozen entries bit-identical, selected rows changed, trainable
    count = sum r*(in+1) + neck/heads = what the optimizer holds."""
    hook = next(h for h in runner.hooks if isinstance(h, APLAHook))
    adapter = hook.adapter
    assert_apla_trained(snapshot.before, snapshot.after, adapter.indices())
    model = unwrap_model(runner.model)
    rows = sum(layer.target_rank * (layer.in_features + int(layer.has_bias))
               for layer in adapter.layers)
    heads = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith('backbone.'))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == rows + heads
    optimizer = runner.optim_wrapper.optimizer
    held = sum(p.numel() for g in optimizer.param_groups for p in g['params'])
    assert held == trainable


@pytest.mark.parametrize('case', sorted(CASES))
def test_two_line_drop_in_on_stock_configs(case, toy_seg_root, toy_coco_root,
                                           tmp_path):
    stock, task, rank, overrides = CASES[case]
    root = toy_seg_root if task == 'seg' else toy_coco_root
    base = shrunk_stock_config(stock, task, overrides, root, str(tmp_path))
    config = write_drop_in(base, rank, str(tmp_path))
    cfg = short_run_cfg(config, str(tmp_path / 'work'), root, max_iters=3,
                        batch_size=2)
    # a learning rate at which every selected row moves in three steps
    cfg.optim_wrapper.optimizer.lr = 1e-2
    if cfg.optim_wrapper.type == 'AmpOptimWrapper':
        # stock `--amp`-style wrapper; mmengine's refuses CPUs, ours is its
        # subclass with bfloat16 autocast
        cfg.optim_wrapper.type = 'PortableAmpOptimWrapper'
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    check_apla_run(runner, snapshot)
    if case == 'mmdet-swin-mask-rcnn':
        ranks = sorted({(layer.target_rank, layer.out_features)
                        for layer in next(
                            h for h in runner.hooks
                            if isinstance(h, APLAHook)).adapter.layers})
        assert ranks == [(8, 32), (16, 64), (32, 128), (64, 256)]


TOY_APLA = 'apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py'


def test_apla_configs_keep_the_stock_optim_wrapper():
    """mmseg's/mmdet's `--amp` assert a plain OptimWrapper; ours have it."""
    paths = sorted(glob.glob(osp.join(REPO_ROOT, 'configs/apla/*.py')))
    assert len(paths) >= 30
    for path in paths:
        cfg = Config.fromfile(path)
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if '-lean_' in path:  # low-precision frozen weights need AMP
            assert wrapper == 'PortableAmpOptimWrapper', path
        else:
            assert wrapper == 'OptimWrapper', path
        # the official recipe: no weight decay on biases and 1-D parameters
        assert cfg.optim_wrapper.paramwise_cfg.bias_decay_mult == 0.0
        assert cfg.optim_wrapper.paramwise_cfg.flat_decay_mult == 0.0


def test_mmengine_amp_optim_wrapper_as_stock_amp_sets_it(
        toy_seg_root, tmp_path):
    """What `mmseg/.mim/tools/train.py --amp` builds: mmengine's own
    AmpOptimWrapper with a dynamic loss scale. It refuses machines without
    an accelerator; with that check patched out it runs here (bfloat16
    autocast, CPU), and APLA needs nothing of its type."""
    from mmengine.optim import AmpOptimWrapper
    cfg = short_run_cfg(TOY_APLA, str(tmp_path), toy_seg_root, max_iters=3,
                        batch_size=2)
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    cfg.optim_wrapper.type = 'AmpOptimWrapper'  # as mmseg's --amp does
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    snapshot = ParamSnapshotHook()
    # the guard stands in for a GPU: on a CPU, torch 2.1's bfloat16
    # flash-attention backward aborts (apla_mm.compat; ours applies it)
    with mock.patch('mmengine.optim.optimizer.amp_optimizer_wrapper.'
                    'is_cuda_available', return_value=True), \
            cpu_autocast_attention_guard('cpu', torch.bfloat16):
        runner = build_runner(cfg, snapshot)
        runner.train()
    assert type(runner.optim_wrapper) is AmpOptimWrapper
    check_apla_run(runner, snapshot)


def _adapted_tiny_model():
    """A tiny segmentor with APLA r=4, an SGD optimizer attached, and
    checks of W_O and its rows."""
    from conftest import TinySegmentor

    from apla_mm.peft import APLAAdapter, APLAConfig
    model = TinySegmentor.timm(depth=2, dim=32)
    adapter = APLAAdapter(model, APLAConfig(rank=4, seed=0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    adapter.attach_optimizer(optimizer)
    adapter.attach_optimizer(optimizer)  # idempotent
    layer = adapter.layers[0]
    m = layer.module

    def w_o():
        return m._parameters['weight'].detach().clone()

    def in_step():
        return torch.equal(m._parameters['weight'][layer.index],
                           m._parameters['apla_weight'])

    return model, optimizer, m, w_o, in_step


def test_skipped_scaler_steps_keep_w_o_in_step():
    """The step post-hook runs only when the optimizer really steps: a step
    the loss scaler skips (inf gradients) changes nothing."""
    from apla_mm.compat import TorchTooOld, grad_scaler
    try:
        scaler = grad_scaler('cpu')
    except TorchTooOld as e:  # torch < 2.3: tools/gpu_report.py checks it
        pytest.skip(f'no loss scaler on a CPU: {e}')
    model, optimizer, m, w_o, in_step = _adapted_tiny_model()
    x = torch.randn(2, 3, 32, 32)
    before, rows = w_o(), m._parameters['apla_weight'].detach().clone()
    loss = model(x).float().pow(2).mean() * float('inf')
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # inf gradients: skipped
    scaler.update()
    optimizer.zero_grad()
    assert torch.equal(w_o(), before)
    assert torch.equal(m._parameters['apla_weight'], rows)
    scaler.scale(model(x).float().pow(2).mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(w_o(), before) and in_step()


def test_accumulation_changes_w_o_at_the_window_end():
    """Under gradient accumulation W_O changes only when the optimizer
    steps, at the window's end, and stays equal to its rows."""
    from mmengine.optim import OptimWrapper
    model, optimizer, m, w_o, in_step = _adapted_tiny_model()
    x = torch.randn(2, 3, 32, 32)
    wrapper = OptimWrapper(optimizer, accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 4)
    moved = []
    for _ in range(4):
        before = w_o()
        wrapper.update_params(model(x).float().pow(2).mean())
        moved.append(not torch.equal(w_o(), before))
        assert in_step()
    assert moved == [False, True, False, True]


MARKER_MODULE = """
import os.path as osp
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DropInMarkerHook(Hook):
    def before_train(self, runner):
        open(osp.join(runner.work_dir, 'marker_hook_ran'), 'w').close()
"""


def _config_with_own_lists(tmp_path) -> str:
    """A config whose base has its own custom_imports and custom_hooks (as
    mmdet's ViTDet project config does)."""
    (tmp_path / 'dropin_marker.py').write_text(MARKER_MODULE)
    base = tmp_path / 'base_with_lists.py'
    parent = repo_config(
        'finetune/upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py')
    base.write_text(
        f'_base_ = [{parent!r}]\n'
        "custom_imports = dict(imports=['apla_mm', 'dropin_marker'],\n"
        "                      allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='DropInMarkerHook')]\n")
    return str(base)


def test_merged_form_keeps_the_base_lists(toy_seg_root, tmp_path,
                                          monkeypatch):
    base = _config_with_own_lists(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    child = tmp_path / 'apla_merged.py'
    child.write_text(
        f'_base_ = [{base!r}]\n'
        'custom_imports = dict(\n'
        "    imports=_base_.custom_imports.imports + ['apla_mm'],\n"
        '    allow_failed_imports=False)\n'
        'custom_hooks = _base_.custom_hooks + [\n'
        "    dict(type='APLAHook', rank=8, seed=0)]\n")
    cfg = short_run_cfg(str(child), str(tmp_path / 'work'), toy_seg_root,
                        max_iters=2, batch_size=2)
    assert cfg.custom_imports.imports == ['apla_mm', 'dropin_marker',
                                          'apla_mm']
    assert [h['type'] for h in cfg.custom_hooks] == ['DropInMarkerHook',
                                                      'APLAHook']
    cfg.optim_wrapper.optimizer.lr = 1e-2
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    assert osp.exists(tmp_path / 'work' / 'marker_hook_ran')
    check_apla_run(runner, snapshot)

    # pasting the plain two lines instead silently drops the base's hook:
    # the reason for the merged form and --apla
    plain = tmp_path / 'apla_pasted.py'
    plain.write_text(DROP_IN.format(base=base, rank=8))
    pasted = Config.fromfile(str(plain))
    assert [h['type'] for h in pasted.custom_hooks] == ['APLAHook']


@pytest.mark.slow
def test_train_cli_apla_switch_keeps_the_base_lists(toy_seg_root, tmp_path):
    base = _config_with_own_lists(tmp_path)
    work = tmp_path / 'work'
    log = run_tool([
        'tools/train.py', base, '--work-dir', str(work), '--apla', 'rank=8',
        'seed=1', '--cfg-options', 'train_cfg.max_iters=2',
        'train_cfg.val_interval=100', 'default_hooks.checkpoint.interval=2',
        f'train_dataloader.dataset.data_root={toy_seg_root}',
        f'val_dataloader.dataset.data_root={toy_seg_root}',
        f'test_dataloader.dataset.data_root={toy_seg_root}',
        'train_dataloader.batch_size=2'
    ], env={'PYTHONPATH': str(tmp_path)})
    assert "--apla: added {'type': 'APLAHook', 'rank': 8, 'seed': 1}" in log
    assert 'APLA: 4 attention output projections' in log
    assert osp.exists(work / 'marker_hook_ran')
    assert osp.exists(work / 'apla_indices.json')
    ckpt = load_weights_only(str(work / 'iter_2.pth'))
    assert ckpt['meta']['apla_mm']['config']['rank'] == 8


def _stock_tool(package: str, name: str) -> str:
    module = __import__(package)
    return osp.join(osp.dirname(module.__file__), '.mim', 'tools', name)


def _without_apla_mm_env() -> dict:
    # the stock tools must run without apla_mm on the path of the base config
    return {'PYTHONPATH': ''}


@pytest.mark.slow
@pytest.mark.parametrize('task', ['seg', 'det'])
def test_packages_own_trainers_and_test_tools(task, toy_seg_root,
                                              toy_coco_root, tmp_path):
    """Train the drop-in with mmseg's/mmdet's own train.py, publish the
    checkpoint, and evaluate it with their own test.py and the *base*
    config (which does not import apla_mm)."""
    if task == 'seg':
        stock, _, rank, overrides = CASES['mmseg-upernet-vit']
        root, package, metric = toy_seg_root, 'mmseg', 'mIoU'
    else:
        stock, _, rank, overrides = CASES['mmdet-swin-mask-rcnn']
        root, package, metric = toy_coco_root, 'mmdet', 'segm_mAP'
    base = shrunk_stock_config(stock, task, overrides, root, str(tmp_path))
    config = write_drop_in(base, rank, str(tmp_path))
    work = tmp_path / 'work'
    log = run_tool([
        _stock_tool(package, 'train.py'), config, '--work-dir', str(work),
        '--cfg-options', 'train_dataloader.batch_size=2'
    ])
    assert 'APLA: ' in log and 'trainable params' in log
    ckpt = str(work / 'iter_2.pth')
    published = str(tmp_path / 'model.pth')
    run_tool(['tools/publish_checkpoint.py', ckpt, published])
    assert 'apla_mm' not in open(base).read()
    log = run_tool([
        _stock_tool(package, 'test.py'), base, published, '--work-dir',
        str(tmp_path / 'test')
    ], env=_without_apla_mm_env())
    assert metric in log
    loaded = torch.load(published, weights_only=True)
    assert loaded['meta']['apla_mm']['method'] == 'apla'
    assert set(loaded) == {'state_dict', 'meta'}


def test_swin_rank_larger_than_a_stage_is_refused(toy_coco_root, tmp_path):
    _, _, _, overrides = CASES['mmdet-swin-mask-rcnn']
    base = shrunk_stock_config(CASES['mmdet-swin-mask-rcnn'][0], 'det',
                               overrides, toy_coco_root, str(tmp_path))
    cfg = short_run_cfg(write_drop_in(base, 48, str(tmp_path)),
                        str(tmp_path / 'work'), toy_coco_root, max_iters=1)
    with pytest.raises(ValueError, match=r'APLA rank 48 exceeds the 32 .*'
                       r'stages\.0\.blocks\.0\.attn\.w_msa\.proj.*rank=0\.25'):
        build_runner(cfg).train()
