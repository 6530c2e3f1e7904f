"""tools/benchmark.py and apla_mm.benchmark: the exact memory account,
method building, outputs and the command line (tiny models, no timing
assertions)."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from apla_mm.benchmark import (BenchmarkOptions, SavedTensorRecorder,
                               Trainee, breakdown, method_label,
                               parse_method, preset_methods, run_benchmark,
                               write_outputs)
from apla_mm.benchmark.peak import measure_peak
from apla_mm.testing import REPO_ROOT

F32 = 4
METHODS = ['full', 'frozen', 'apla-r16', 'apla-r16-cp', 'lora-r8']


@pytest.fixture(autouse=True)
def one_thread():
    """Small models run fastest and steadiest on one thread of a small,
    shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------
# method names
def test_parse_method_names():
    assert parse_method('full') == dict(kind='full', with_cp=False)
    assert parse_method('full-cp') == dict(kind='full', with_cp=True)
    assert parse_method('apla-r64-cp') == dict(kind='apla', rank=64,
                                               with_cp=True)
    assert parse_method('apla-full') == dict(kind='apla', rank='full',
                                             with_cp=False)
    assert parse_method('lora-r8') == dict(kind='lora', rank=8)
    assert parse_method('meta') == dict(kind='meta')
    for bad in ('apla', 'apla-r0', 'lora', 'apla-64', 'full-lora'):
        with pytest.raises(ValueError):
            parse_method(bad)
    assert method_label('apla-r64-cp') == 'APLA r=64 + act. ckpt'
    assert method_label('my_config') == 'my_config'


def test_preset_configs_are_the_method_configs():
    specs, preset = preset_methods('seg', 'tiny', methods=METHODS + ['meta'])
    by_name = {s.name: s.cfg for s in specs}
    assert preset['size'] == 64
    assert by_name['full'].get('custom_hooks') in (None, [])
    assert by_name['frozen'].model.backbone.frozen is True
    assert by_name['apla-r16'].custom_hooks == [
        dict(type='APLAHook', rank=16, seed=0)
    ]
    assert by_name['apla-r16-cp'].custom_hooks[1]['checkpoint_blocks'] is True
    assert by_name['lora-r8'].custom_hooks[0]['type'] == 'LoRAHook'
    assert by_name['meta'].model.backbone.type == 'METAAdapterViT'
    for cfg in by_name.values():
        assert cfg.model.backbone.model_kwargs['img_size'] == 64
        assert cfg.model.data_preprocessor.size == (64, 64)
    with pytest.raises(ValueError, match='META'):
        preset_methods('backbone', 'tiny', methods=['meta'])


# ----------------------------------------------------------------------
# the saved-tensor account on hand-made graphs
def test_saved_tensors_exclude_parameter_storages():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorRecorder(lin) as rec:
        y = lin(x).relu().sum()
    # linear keeps x (for the weight's gradient) and its weight (a
    # parameter: not counted); relu keeps its output
    assert rec.result.saved == 2 * 4 * 8 * F32
    y.backward()
    assert x.grad is not None and lin.weight.grad is not None

    lin.requires_grad_(False)
    with SavedTensorRecorder(lin) as rec:
        y = lin(x).relu().sum()
    # a frozen linear keeps no input, only its weight (not counted)
    assert rec.result.saved == 4 * 8 * F32
    entries = breakdown(rec.result.saved_entries)
    assert [e['fn'] for e in entries] == ['relu']


def test_saved_tensors_count_each_storage_once():
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorRecorder(nn.Module()) as rec:
        a = x.exp()  # keeps its output a
        # sin and cos keep views of a: the same storage
        loss = a[:2].sin().sum() + a.view(8, 4).t().cos().sum()
    assert rec.result.saved == 4 * 8 * F32
    loss.backward()


def test_saved_tensors_ignore_graphs_freed_during_forward():
    x = torch.randn(64, 64, requires_grad=True)
    with SavedTensorRecorder(nn.Module()) as rec:
        dropped = x.exp().sum()  # its graph dies with `dropped`
        del dropped
        kept = x.sin().sum()
    assert rec.result.saved == 64 * 64 * F32  # sin keeps x only
    kept.backward()


def test_checkpointed_regions_are_counted_as_inputs_plus_recompute():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorRecorder(block) as plain:
        out = block(x).sum()  # (a graph dropped at once would count 0)
    hidden = 4 * 32 * F32
    # x (first linear), GELU input, GELU output (second linear)
    assert plain.result.saved == 4 * 8 * F32 + 2 * hidden
    with SavedTensorRecorder(block) as rec:
        out = checkpoint(block, x, use_reentrant=False).sum()
    assert rec.result.regions == 1
    assert rec.result.saved == 4 * 8 * F32  # the region's input
    assert rec.result.recompute == 2 * hidden  # rebuilt in backward
    out.backward()  # still a valid graph
    assert x.grad is not None


# ----------------------------------------------------------------------
# a whole (tiny) benchmark
@pytest.fixture(scope='module')
def tiny_seg():
    # one thread: fast and steady on a small, shared machine
    opts = BenchmarkOptions(task='seg', model='tiny', methods=METHODS,
                            steps=1, warmup=0, peak=False, progress=False,
                            threads=1)
    return run_benchmark(opts)


def _by_name(results):
    return {r['name']: r for r in results['methods']}


def _tiny_apla_model(rank):
    specs, _ = preset_methods('seg', 'tiny', methods=[f'apla-r{rank}'])
    return Trainee(specs[0], batch_size=2, size=64)


def test_memory_account_orders_methods(tiny_seg):
    r = _by_name(tiny_seg)
    total = {k: v['memory']['total'] for k, v in r.items()}
    assert total['frozen'] < total['apla-r16'] < total['full']
    assert total['apla-r16-cp'] < total['apla-r16']
    assert total['apla-r16'] < total['lora-r8']
    mem = r['apla-r16-cp']['memory']
    assert mem['checkpointed_regions'] == 4 and mem['recompute'] > 0
    assert mem['saved'] < r['apla-r16']['memory']['saved']
    # the frozen backbone saves nothing for backward
    parts = {g['where'] for g in r['frozen']['memory']['saved_by_part']}
    assert 'backbone' not in parts and 'decode_head' in parts


def test_apla_grads_and_adamw_state_are_rows_plus_heads(tiny_seg):
    trainee = _tiny_apla_model(16)
    model = trainee.model
    rows = 0
    for layer in trainee.adapter.layers:
        weight = layer.module._parameters['weight']
        rows += 16 * (weight.shape[1] + 1)  # r rows of W_O and their biases
    assert len(trainee.adapter.layers) == 4
    heads = sum(p.numel() for n, p in model.named_parameters()
                if not n.startswith('backbone.'))
    weights = sum(p.numel() for p in model.parameters()) * F32 + sum(
        b.numel() * b.element_size() for b in model.buffers())

    mem = _by_name(tiny_seg)['apla-r16']['memory']
    assert mem['grads'] == F32 * (rows + heads)
    assert mem['optimizer'] == 2 * F32 * (rows + heads)
    assert mem['weights'] == weights
    params = _by_name(tiny_seg)['apla-r16']['params']
    assert params['trainable'] == rows + heads
    # the rows are not counted twice in the model size
    assert params['total'] == _by_name(tiny_seg)['full']['params']['total']

    full = _by_name(tiny_seg)['full']
    assert full['memory']['grads'] == F32 * full['params']['total']
    assert full['memory']['optimizer'] == 2 * full['memory']['grads']


def test_delta_file_sizes(tiny_seg):
    r = _by_name(tiny_seg)
    delta = {k: v['params']['delta_tensor_bytes'] for k, v in r.items()}
    heads = F32 * sum(
        e['trainable'] for name, e in r['frozen']['params']['parts'].items()
        if name != 'backbone')
    assert delta['frozen'] > heads  # + the heads' BN statistics
    assert delta['apla-r16'] == delta['frozen'] + F32 * 4 * 16 * 65
    assert delta['frozen'] < delta['lora-r8'] < delta['full']
    assert r['apla-r16']['params']['delta_file_bytes'] > delta['apla-r16']


def test_outputs_contain_every_method(tiny_seg, tmp_path):
    paths = write_outputs(tiny_seg, str(tmp_path), title='tiny test')
    md = open(paths['md']).read()
    data = json.load(open(paths['json']))
    with open(paths['png'], 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert [m['name'] for m in data['methods']] == METHODS
    for m in tiny_seg['methods']:
        assert f"| {m['label']} |" in md
        assert {'train_time', 'infer_time', 'memory', 'params'} <= set(m)
        assert set(m['ratios']) == {'memory', 'memory_fp32', 'train_time',
                                    'infer_time'}
        assert m['ratios']['memory'] == m['ratios']['memory_fp32']
    meta = data['meta']
    assert meta['size'] == 64 and meta['batch'] == 2
    assert meta['versions']['torch'] == torch.__version__
    assert 'torch ' + torch.__version__ in md and '64x64' in md


def test_trained_apla_model_runs_the_plain_weights(tiny_seg):
    trainee = _tiny_apla_model(16)
    trainee.train_step()
    trainee.prepare_inference()
    proj = trainee.adapter.layers[0].module
    with torch.no_grad():
        assert proj.weight is proj._parameters['weight']
    index = proj._buffers['apla_index']
    assert torch.equal(proj._parameters['weight'][index],
                       proj._parameters['apla_weight'])


# ----------------------------------------------------------------------
# separate processes (a few seconds each)
@pytest.mark.slow
def test_peak_measurement_in_a_fresh_process(tmp_path):
    specs, _ = preset_methods('backbone', 'tiny', methods=['apla-r16'])
    path = str(tmp_path / 'apla.py')
    specs[0].cfg.dump(path)
    peak = measure_peak(path, 'apla-r16', 'backbone', 64, 2, 'cpu', steps=1,
                        threads=1)
    assert peak['increment'] > 0 and peak['peak'] >= peak['baseline']
    assert peak['kind'].startswith('peak RSS')


@pytest.mark.slow
def test_cli_smoke(tmp_path):
    out = str(tmp_path / 'out')
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.run(
        [sys.executable, 'tools/benchmark.py', 'backbone', '--model', 'tiny',
         '--methods', 'full,apla-r16', '--steps', '1', '--warmup', '0',
         '--no-peak', '--no-progress', '--threads', '1', '--out', out],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ext in ('md', 'json', 'png'):
        assert osp.isfile(osp.join(out, f'benchmark.{ext}'))
    assert 'APLA r=16' in proc.stdout
