"""What a killed run keeps (issue 13): SIGKILLs of tools/train.py during
checkpoint saves with max_keep_ckpts=1, resumes to the end, frozen entries
bit-identical to the pretrained file."""
import glob
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from apla_mm.testing import REPO_ROOT, run_tool
from apla_mm.utils.checkpoint_io import (list_checkpoints,
                                         read_last_checkpoint,
                                         verify_checkpoint_file)

pytestmark = pytest.mark.slow

TOYBASE = ('configs/apla/apla-r16-toybase_upernet_vit-tiny_mln_1xb8-600it_'
           'toyseg-64x64.py')
MAX_ITERS = 7
_TMP = re.compile(r'^\.iter_(\d+)\.pth\.tmp$')


@pytest.fixture(scope='module')
def toy_backbone(tmp_path_factory):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'make_toy_data', osp.join(REPO_ROOT, 'tools', 'make_toy_data.py'))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.make_toy_pretrained(str(tmp_path_factory.mktemp('toybase')))


def _train_args(work, root, backbone):
    return [
        sys.executable, 'tools/train.py', TOYBASE, '--work-dir', work,
        '--cfg-options', f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'model.backbone.init_cfg.checkpoint={backbone}',
        'train_dataloader.batch_size=2', f'train_cfg.max_iters={MAX_ITERS}',
        'train_cfg.val_interval=1000', 'default_hooks.checkpoint.interval=1',
        'default_hooks.checkpoint.max_keep_ckpts=1',
        'default_hooks.logger.interval=1'
    ]


def _env():
    return dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')


def _kill_during_save(args, work, min_step, log_path):
    """Start a run; SIGKILL it as soon as it is writing the checkpoint of
    step >= ``min_step``. Returns that step (None if the run ended first)."""
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if osp.isdir(work):
                    for name in os.listdir(work):
                        m = _TMP.match(name)
                        if m and int(m.group(1)) >= min_step:
                            proc.send_signal(signal.SIGKILL)
                            proc.wait()
                            return int(m.group(1))
                time.sleep(0.001)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return None


def _assert_recoverable(work):
    """A killed run leaves only complete checkpoints under their names, and
    at least one."""
    names = list_checkpoints(work)
    assert names, f'no checkpoint left in {os.listdir(work)}'
    for path in names:
        verify_checkpoint_file(path)
    pointer = read_last_checkpoint(work)
    assert pointer is not None and osp.isfile(pointer), pointer
    verify_checkpoint_file(pointer)


def test_kills_during_saves_keep_a_resumable_run(
        toy_seg_root, toy_backbone, tmp_path):
    work = str(tmp_path / 'work')
    args = _train_args(work, toy_seg_root, toy_backbone)
    kills, min_step = [], 2
    for attempt in range(3):
        resume = ['--resume'] if attempt else []
        step = _kill_during_save(args + resume, work, min_step,
                                 str(tmp_path / f'log{attempt}.txt'))
        assert step is not None, open(tmp_path / f'log{attempt}.txt').read()
        kills.append(step)
        _assert_recoverable(work)
        min_step = step + 1
        if attempt == 1:
            # An empty pointer must not make --resume start over.
            with open(osp.join(work, 'last_checkpoint'), 'w'):
                pass
    assert kills == sorted(kills) and len(set(kills)) == 3

    # The pointer lost altogether: --resume takes the newest intact file.
    os.remove(osp.join(work, 'last_checkpoint'))
    newest = list_checkpoints(work)[0]
    log = run_tool(args[1:] + ['--resume'], env={'OMP_NUM_THREADS': '1'})
    assert f'--resume: continuing from {newest}' in log
    resumed_at = int(re.search(r'iter_(\d+)\.pth', newest).group(1))
    assert f'resumed epoch: 0, iter: {resumed_at}' in log
    assert resumed_at >= kills[-1] - 1

    # max_keep_ckpts=1 holds at the end: leftovers of the kills are gone.
    assert [osp.basename(p) for p in list_checkpoints(work)] == [
        f'iter_{MAX_ITERS}.pth']
    assert not glob.glob(osp.join(work, '.*.tmp'))
    final = torch.load(osp.join(work, f'iter_{MAX_ITERS}.pth'))
    assert final['meta']['iter'] == MAX_ITERS

    # Frozen entries equal the pretrained file bit for bit; the APLA rows
    # moved.
    pretrained = torch.load(toy_backbone)['state_dict']
    layers = final['meta']['apla_mm']['layers']
    moved = 0
    for key, value in pretrained.items():
        trained = final['state_dict']['backbone.' + key]
        layer = 'backbone.' + key.rsplit('.', 1)[0]
        if layer in layers:
            rows = torch.as_tensor(layers[layer]['index'])
            keep = torch.ones(value.shape[0], dtype=torch.bool)
            keep[rows] = False
            assert torch.equal(trained[keep], value[keep]), key
            moved += int(not torch.equal(trained[rows], value[rows]))
        else:
            assert torch.equal(trained, value), key
    assert moved > 0
