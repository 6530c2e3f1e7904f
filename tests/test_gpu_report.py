"""tools/gpu_report.py: the whole report on a CPU with tiny models
(``--device cpu --quick``, the code path a GPU runs), and the pieces of the
loss-scaler check on their own."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from apla_mm.benchmark.amp_check import (changed_entries,
                                         inject_inf_gradient, judge_skip,
                                         snapshot, trainable_target)
from apla_mm.compat import TorchTooOld, grad_scaler
from apla_mm.testing import REPO_ROOT


def _cpu_scaler():
    try:
        return grad_scaler('cpu')
    except TorchTooOld as e:
        pytest.skip(f'no loss scaler on a CPU: {e}')


def test_poisoned_step_is_judged_skipped_and_clean_step_is_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1)
    scaler = _cpu_scaler()
    x = torch.randn(8, 4)

    def step():
        optimizer.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(optimizer)
        scaler.update()

    step()
    name, param = trainable_target(model)
    assert name == '1.weight'  # no backbone: the first trainable one
    before, scale = snapshot(model, optimizer), scaler.get_scale()
    assert any(k.startswith('optim:1.weight:') for k in before)
    with inject_inf_gradient(param) as calls:
        step()
    verdict = judge_skip(before, snapshot(model, optimizer), calls['calls'],
                         scale, scaler.get_scale())
    assert verdict['status'] == 'passed', verdict['problems']
    assert verdict['scale_after'] == scale / 2

    before, scale = snapshot(model, optimizer), scaler.get_scale()
    step()  # not poisoned: the weights and AdamW state move
    after = snapshot(model, optimizer)
    verdict = judge_skip(before, after, 1, scale, scaler.get_scale())
    assert verdict['status'] == 'failed'
    assert 'param:1.weight' in changed_entries(before, after)
    assert 'param:0.weight' not in changed_entries(before, after)


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    proc = subprocess.run(
        [sys.executable, 'tools/gpu_report.py', '--out', str(tmp_path),
         '--device', 'cuda', '--quick'], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'torch sees no GPU' in proc.stderr
    assert '--device cpu --quick' in proc.stderr


@pytest.mark.slow
def test_quick_report_on_a_cpu(tmp_path):
    """``tools/gpu_report.py --device cpu --quick``, run as a user would
    (90-150 s on two busy cores; one test, so that pytest-xdist runs it
    once)."""
    out = str(tmp_path)
    env = dict(os.environ, PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, 'tools/gpu_report.py', '--out', out, '--device',
         'cpu', '--quick', '--threads', '1'], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=900)
    with open(osp.join(out, 'report.md')) as f:
        md = f.read()
    with open(osp.join(out, 'report.json')) as f:
        data = json.load(f)
    _check_sections(proc, data, md)
    _check_memory(data)
    _check_time_and_inference(data)
    _check_stock_amp_runs(data)


def _check_sections(proc, data, md):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data['passed'] and not data['errors']
    assert data['checks'] and all(c['passed'] for c in data['checks'])
    for heading in ('## Machine', '## Checks',
                    '## Memory: exact account vs measured peak',
                    '## Time: training step', '### Inference: merged APLA',
                    '## The stock `--amp` path',
                    'What the account leaves out: '):
        assert heading in md, heading
    assert 'cuBLAS' in md and 'CUDA context' in md
    machine = data['machine']
    assert machine['torch'] == torch.__version__
    assert machine['device'] == 'cpu' and machine['mmseg']
    assert data['command'].startswith('python tools/gpu_report.py --out ')
    assert data['seconds']['total'] > 0


def _check_memory(data):
    memory = data['memory']
    groups = {g['precision']: g for g in memory['groups']}
    assert sorted(groups) == ['bf16', 'fp32']
    assert 'fp16' in memory['precisions_skipped']
    for group in groups.values():
        rows = {r['name']: r for r in group['methods']}
        assert list(rows) == ['full', 'frozen', 'apla-r16', 'apla-r16+all',
                              'lora-r8']
        total = {n: r['account']['total'] for n, r in rows.items()}
        assert total['frozen'] < total['apla-r16'] < total['full']
        assert total['apla-r16+all'] < total['apla-r16']
        for row in rows.values():
            assert row['account']['total'] > 0
            assert row['peak']['bytes'] > 0
            # a CPU's peak: the resident set of a fresh process per method
            # (apla_mm.benchmark.peak.measure_peak), measured, not derived
            assert row['peak']['source'] == 'fresh process'
            assert row['peak']['kind'].startswith('peak RSS (VmHWM)')
            assert 'measure_peak' in row['peak']['kind']
            assert row['peak_in_process']['bytes'] != 0
            assert row['peak_over_account'] == pytest.approx(
                row['peak']['bytes'] / row['account']['total'])
            assert sum(row['sdpa'].values()) == 4  # 4 ViT blocks
            assert set(row['sdpa']) <= {'flash-cpu', 'math'}
        # gradients and AdamW state only for what trains
        assert rows['frozen']['account']['grads'] < \
            rows['apla-r16']['account']['grads'] < \
            rows['full']['account']['grads']
    assert memory['peaks_from_fresh_processes']
    check, = memory['cross_checks']
    assert check['method'] == 'apla-r16' and check['precision'] == 'fp32'
    assert check['fresh'] > 0 and check['in_process'] > 0
    assert check['decisive'] is False  # informative on a CPU


def _check_time_and_inference(data):
    for group in data['memory']['groups']:
        rows = {r['name']: r for r in group['methods']}
        for row in rows.values():
            assert row['train_time']['n'] >= 5
            assert row['train_time']['median'] > 0
        assert rows['full']['time_ratio'] == 1.0
        assert rows['full']['flops_ratio'] == 1.0
        # the arithmetic: a frozen backbone is the floor, APLA above it
        assert rows['frozen']['flops_ratio'] < rows['apla-r16'][
            'flops_ratio'] < 1.0
        inference = group['inference']
        assert inference['method'] == 'apla-r16'
        assert inference['merge_max_abs_diff'] == 0
        assert inference['merged_modules'] == []
        assert inference['base_median'] > 0 and inference['ratio'] > 0


def _check_stock_amp_runs(data):
    amp = data['amp']
    runs = {r['tool']: r for r in amp['runs']}
    assert sorted(runs) == ['apla_mm', 'mmseg']
    for run in runs.values():
        assert run['returncode'] == 0
        assert run['status'] == 'passed', run['problems']
        assert run['frozen_bit_identical'] and run['selected_rows_moved']
        assert run['adapted_layers'] == 4 and run['rows_per_layer'] == [16]
        assert run['head_entries_moved'] > 0 and run['finite_weights']
        # on a CPU neither wrapper has a loss scaler to skip a step
        assert run['probe']['status'] == 'not applicable'
    assert '.mim/tools/train.py' in runs['mmseg']['command']
    assert '--amp' not in runs['mmseg']['command']
    assert 'GPU' in runs['mmseg']['amp_skipped']
    assert runs['apla_mm']['command'].endswith('--amp')
    assert 'PortableAmpOptimWrapper' in runs['apla_mm']['amp_note']
    direct = amp['trainee_skip_check']
    try:
        grad_scaler('cpu')
    except TorchTooOld:
        assert direct['status'] == 'skipped'
    else:
        assert direct['status'] == 'passed', direct['problems']
        assert direct['scale_after'] == direct['scale_before'] / 2
        assert direct['next_step_trains']
        assert direct['target'].startswith('backbone.')


def test_gpu_check_without_a_wheelhouse_says_how_to_make_one(tmp_path):
    proc = subprocess.run(
        ['bash', 'tools/gpu_check.sh', '--wheelhouse', str(tmp_path / 'no'),
         '--out', str(tmp_path / 'out')], cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert '--make-wheelhouse' in proc.stderr
    # the exclusions are names make_wheelhouse.sh can drop, one per line
    with open(osp.join(REPO_ROOT, 'tools', 'constraints',
                       'gpu-machine-excludes.txt')) as f:
        names = [line.split()[0] for line in f
                 if line.strip() and not line.startswith('#')]
    assert {'torch', 'torchvision'}.isdisjoint(names)  # always left out
    assert {'opencv-python', 'numpy', 'scipy', 'timm'} <= set(names)
