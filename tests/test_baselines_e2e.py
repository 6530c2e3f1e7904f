"""Every baseline trains a few iterations through tools/train.py, on the toy
segmentation and detection sets, and only what it should train moves."""
import os.path as osp

import pytest
import torch

from apla_mm.testing import REPO_ROOT, run_tool

pytestmark = pytest.mark.slow

SEG = '1xb8-600it_toyseg-64x64'
DET = 'simple-fpn_1xb8-200it_toycoco-128x128'
# config, task, what may move inside the backbone: 'nothing', a parameter
# name part ('lora' -> 'lora_A'/'lora_B'), or 'adapter' (not the ViT)
RUNS = {
    'frozen-seg': (f'finetune/frozen_upernet_timm-vit-tiny_mln_{SEG}', 'seg',
                   'nothing'),
    'lora-seg': (f'lora/lora-r8_upernet_timm-vit-tiny_mln_{SEG}', 'seg',
                 'lora'),
    'frozen-det': (f'finetune/frozen_mask-rcnn_timm-vit-tiny_{DET}', 'det',
                   'nothing'),
    'lora-det': (f'lora/lora-r8_mask-rcnn_timm-vit-tiny_{DET}', 'det',
                 'lora'),
    'meta-seg': (f'meta_adapter/meta-adapter_upernet_timm-vit-tiny_{SEG}',
                 'seg', 'adapter'),
    'meta-det': ('meta_adapter/meta-adapter_mask-rcnn_timm-vit-tiny_fpn_'
                 '1xb8-200it_toycoco-128x128', 'det', 'adapter'),
}


def _config(tmp_path, base):
    """The repository config plus the hook that records the weights."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', base + '.py'))
    hooks = list(cfg.get('custom_hooks', [])) + [
        dict(type='RankStateDumpHook')
    ]
    imports = sorted({'apla_mm', 'apla_mm.testing'} | set(
        cfg.get('custom_imports', {}).get('imports', [])))
    path = tmp_path / 'config.py'
    path.write_text(
        f"_base_ = ['{osp.join(REPO_ROOT, 'configs', base + '.py')}']\n"
        f'custom_imports = dict(imports={imports!r}, '
        'allow_failed_imports=False)\n'
        f'custom_hooks = {hooks!r}\n')
    return str(path)


@pytest.mark.parametrize('run', sorted(RUNS))
def test_baseline_trains_through_tools(run, toy_seg_root, toy_coco_root,
                                       tmp_path):
    base, task, movable = RUNS[run]
    root = toy_seg_root if task == 'seg' else toy_coco_root
    work = str(tmp_path / 'work')
    args = [
        'tools/train.py',
        _config(tmp_path, base), '--work-dir', work, '--cfg-options',
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        'train_dataloader.batch_size=2', 'train_cfg.max_iters=2',
        'train_cfg.val_interval=3', 'default_hooks.checkpoint.interval=2'
    ]
    if task == 'det':
        args.append(f'val_evaluator.ann_file={root}/annotations/'
                    'instances_val.json')
    run_tool(args, env={'OMP_NUM_THREADS': '1'})
    assert osp.isfile(osp.join(work, 'iter_2.pth'))
    state = torch.load(osp.join(work, 'rank0_state.pth'))
    moved = {
        k
        for k, v in state['after'].items()
        if not torch.equal(state['before'][k], v)
    }
    in_backbone = {k for k in moved if k.startswith('backbone.')}
    if movable == 'nothing':
        assert not in_backbone
    elif movable == 'adapter':
        assert in_backbone
        assert not any(k.startswith('backbone.vit.') for k in in_backbone)
    else:
        assert in_backbone and all(f'{movable}_' in k for k in in_backbone)
    assert moved - in_backbone, 'the neck/heads did not train'
