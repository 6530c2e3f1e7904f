"""Two CPU processes (gloo) through tools/dist_train.sh, as users run it."""
import os
import os.path as osp
import socket

import pytest
import torch

from apla_mm.testing import REPO_ROOT, run_tool

pytestmark = pytest.mark.slow

APLA = 'apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
LORA = 'lora/lora-r8_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
META = 'meta_adapter/meta-adapter_upernet_timm-vit-tiny_1xb8-600it_toyseg-64x64.py'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_config(tmp_path, base, hook):
    path = tmp_path / f'{osp.basename(base)}'
    path.write_text(
        f"_base_ = ['{osp.join(REPO_ROOT, 'configs', base)}']\n"
        "custom_imports = dict(imports=['apla_mm', 'apla_mm.testing'], "
        'allow_failed_imports=False)\n'
        f"custom_hooks = [{hook + ', ' if hook else ''}"
        "dict(type='RankStateDumpHook')]\n")
    return str(path)


def _options(root, max_iters):
    return [
        '--cfg-options', f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        'train_dataloader.batch_size=2', f'train_cfg.max_iters={max_iters}',
        f'train_cfg.val_interval={max_iters + 1}',
        'default_hooks.checkpoint.interval=2', 'param_scheduler.0.end=1',
        'param_scheduler.1.begin=1', f'param_scheduler.1.end={max_iters}'
    ]


def _run(args, nproc):
    env = dict(OMP_NUM_THREADS='1', PORT=str(_free_port()))
    if nproc > 1:
        cmd = ['bash', 'tools/dist_train.sh', args[0], str(nproc), *args[1:]]
    else:
        cmd = ['tools/train.py', *args]
    return run_tool(cmd, env=env)


def _states(work):
    return [torch.load(osp.join(work, f'rank{r}_state.pth')) for r in (0, 1)]


def _assert_same_weights(rank0, rank1):
    assert len(rank0['param_names']) > 50
    for key in rank0['param_names']:
        assert torch.equal(rank0['after'][key], rank1['after'][key]), key


def test_apla_two_processes(toy_seg_root, tmp_path):
    config = _write_config(tmp_path, APLA,
                           "dict(type='APLAHook', rank=16, seed=0)")
    work = str(tmp_path / 'work')
    log = _run([config, '--work-dir', work, *_options(toy_seg_root, 4)], 2)
    assert 'rebuilt the DDP wrapper' in log
    rank0, rank1 = _states(work)

    # same channels on both ranks, derived from (seed, layer name)
    assert rank0['meta'] == rank1['meta'] is not None
    from apla_mm.peft.apla import random_channels
    for name, info in rank0['meta']['layers'].items():
        assert info['index'] == random_channels(64, 16, 0, name).tolist()

    # identical weights on both ranks after training (BatchNorm statistics
    # are per process: SyncBN needs GPUs)
    _assert_same_weights(rank0, rank1)

    # DDP synchronises exactly the trainable tensors: rows + neck/heads
    synced = rank0['ddp_synced']
    assert synced == rank1['ddp_synced']
    backbone = [n for n in synced if n.startswith('backbone')]
    assert backbone and all(n.endswith(('apla_weight', 'apla_bias'))
                            for n in backbone)
    assert any(n.startswith('decode_head') for n in synced)

    # frozen entries bit-identical, selected rows trained
    for key, before in rank0['before'].items():
        after = rank0['after'][key]
        if not key.startswith('backbone'):
            continue
        layer = key.rsplit('.', 1)[0]
        if layer in rank0['meta']['layers']:
            index = rank0['meta']['layers'][layer]['index']
            keep = torch.ones(before.shape[0], dtype=torch.bool)
            keep[index] = False
            assert torch.equal(before[keep], after[keep]), key
            assert not torch.equal(before[~keep], after[~keep]), key
        else:
            assert torch.equal(before, after), key

    # the checkpoint resumes in one process ...
    single = str(tmp_path / 'single')
    os.makedirs(single)
    _run([config, '--work-dir', single, '--resume',
          osp.join(work, 'iter_2.pth'), *_options(toy_seg_root, 4)], 1)
    resumed = torch.load(osp.join(single, 'rank0_state.pth'))
    assert resumed['meta'] == rank0['meta']
    assert resumed['ddp_synced'] is None
    # ... and in two
    log = _run([config, '--work-dir', work, '--resume',
                *_options(toy_seg_root, 6)], 2)
    assert 'resumed epoch: 0, iter: 4' in log
    rank0, rank1 = _states(work)
    assert rank0['meta'] == rank1['meta']
    _assert_same_weights(rank0, rank1)


@pytest.mark.parametrize('method', ['lora', 'meta'])
def test_baseline_two_processes(method, toy_seg_root, tmp_path):
    if method == 'lora':
        config = _write_config(tmp_path, LORA,
                               "dict(type='LoRAHook', rank=8, alpha=16)")
    else:  # a backbone, no hook: the ViT is frozen at construction
        config = _write_config(tmp_path, META, '')
    work = str(tmp_path / 'work')
    _run([config, '--work-dir', work, *_options(toy_seg_root, 3)], 2)
    rank0, rank1 = _states(work)
    _assert_same_weights(rank0, rank1)
    backbone = [n for n in rank0['ddp_synced'] if n.startswith('backbone')]
    moved = [k for k in rank0['after']
             if k.startswith('backbone')
             and not torch.equal(rank0['before'][k], rank0['after'][k])]
    assert backbone and moved
    if method == 'lora':
        assert all('lora_' in n for n in backbone + moved)
    else:
        assert not any(n.startswith('backbone.vit.') for n in backbone + moved)
