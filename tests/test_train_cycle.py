"""End to end through tools/train.py and tools/test.py (subprocesses)."""
import glob
import json
import os.path as osp

import pytest
import torch

from apla_mm.testing import run_tool as _run_tool

pytestmark = pytest.mark.slow

FT = 'configs/finetune/upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
APLA = 'configs/apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
APLA_BASE = ('configs/finetune/'
             'upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py')


def run_tool(tool, *args):
    return _run_tool([f'tools/{tool}.py', *args])


def data_options(root, max_iters, interval):
    return [
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}',
        'train_dataloader.batch_size=2', f'train_cfg.max_iters={max_iters}',
        f'train_cfg.val_interval={max_iters}',
        f'default_hooks.checkpoint.interval={interval}',
        'default_hooks.logger.interval=1',
        'param_scheduler.0.end=1', 'param_scheduler.1.begin=1',
        f'param_scheduler.1.end={max_iters}'
    ]


def metrics_of(work_dir):
    files = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    assert files, f'no metrics json under {work_dir}'
    with open(files[-1]) as f:
        return json.loads(f.read().strip().splitlines()[-1])


def test_train_checkpoint_resume_test(toy_seg_root, tmp_path):
    work = str(tmp_path / 'ft')
    run_tool('train', FT, '--work-dir', work, '--cfg-options',
             *data_options(toy_seg_root, 4, 2))
    assert osp.isfile(osp.join(work, 'iter_4.pth'))
    log = run_tool('train', FT, '--work-dir', work, '--resume',
                   '--cfg-options', *data_options(toy_seg_root, 6, 2))
    assert 'resumed epoch: 0, iter: 4' in log
    ckpt = torch.load(osp.join(work, 'iter_6.pth'))
    assert ckpt['meta']['iter'] == 6

    out, show = str(tmp_path / 'pred'), str(tmp_path / 'show')
    test_dir = str(tmp_path / 'test')
    run_tool('test', FT, osp.join(work, 'iter_6.pth'), '--work-dir',
             test_dir, '--out', out, '--show-dir', show, '--cfg-options',
             f'test_dataloader.dataset.data_root={toy_seg_root}',
             # testing must neither need nor build the training data
             f'train_dataloader.dataset.data_root={tmp_path}/absent')
    assert 'mIoU' in metrics_of(test_dir)
    assert len(glob.glob(osp.join(out, '*.png'))) == 8
    assert len(glob.glob(osp.join(show, '**', '*.png'), recursive=True)) == 8


def test_apla_amp_resume_and_test_with_base_config(toy_seg_root, tmp_path):
    work = str(tmp_path / 'apla')
    log = run_tool('train', APLA, '--work-dir', work, '--amp',
                   '--cfg-options', *data_options(toy_seg_root, 3, 3))
    assert '--amp: optimizer wrapper is PortableAmpOptimWrapper' in log
    assert 'trainable params:' in log
    run_tool('train', APLA, '--work-dir', work, '--amp', '--resume',
             '--cfg-options', *data_options(toy_seg_root, 5, 5))
    ckpt = torch.load(osp.join(work, 'iter_5.pth'))
    assert ckpt['meta']['apla_mm']['config']['rank'] == 16
    # The checkpoint of an APLA run is a plain model: the base config reads
    # it, with the same result as the APLA config.
    metrics = []
    for config in (APLA_BASE, APLA):
        test_dir = str(tmp_path / f'test_{len(metrics)}')
        run_tool('test', config, osp.join(work, 'iter_5.pth'), '--work-dir',
                 test_dir, '--cfg-options',
                 f'test_dataloader.dataset.data_root={toy_seg_root}')
        metrics.append(metrics_of(test_dir)['mIoU'])
    assert metrics[0] == metrics[1]


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(AssertionError) as info:
        run_tool('train', FT, '--work-dir', str(tmp_path), '--cfg-options',
                 f'train_dataloader.dataset.data_root={tmp_path}/toy_seg',
                 f'val_dataloader.dataset.data_root={tmp_path}/toy_seg')
    assert 'tools/make_toy_data.py' in str(info.value)
