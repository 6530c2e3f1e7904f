"""The abstract (fake-tensor) memory account, AMP accounts, SDPA kernel
options, memory-option method names and the planner (tiny models; the
accounts are compared exactly, nothing is timed)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from apla_mm.compat import FLOPS_PER_MODULE
from apla_mm.benchmark.abstract import (AbstractCompute, check_all_fake,
                                        fake_parameters, is_fake,
                                        new_fake_mode)
from apla_mm.benchmark.account import account_step
from apla_mm.benchmark.edits import apply_method
from apla_mm.benchmark.presets import preset_methods
from apla_mm.benchmark.specs import (method_label, parse_method,
                                     resolve_options)
from apla_mm.benchmark.trainee import Trainee
from apla_mm.benchmark.planner import (PlanOptions, Planner, format_plan,
                                       parse_memory, plan)
from apla_mm.benchmark.sdpa import SDPABackend, check_backend
from apla_mm.testing import REPO_ROOT

KEYS = ('weights', 'grads', 'optimizer', 'saved', 'recompute', 'total')
SEG = ['full', 'frozen', 'apla-r16', 'apla-r16-cp', 'lora-r8']


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _accounts(task, model, name, amp=None, sdpa='auto', batch=2,
              size=None):
    specs, preset = preset_methods(task, model, size=size, methods=[name],
                                   amp=amp)
    size = size or preset['size']
    out = {}
    for abstract in (False, True):
        trainee = Trainee(specs[0], batch, size, amp=amp, abstract=abstract,
                          sdpa=sdpa)
        out[abstract] = account_step(trainee)
    return out[False], out[True]


# ----------------------------------------------------------------------
# abstract == real
@pytest.mark.parametrize('name,amp', [(n, None) for n in SEG] +
                         [('full', 'bf16'), ('frozen', 'bf16'),
                          ('apla-r16-cp', 'bf16')])
def test_abstract_seg_account_equals_the_real_one(name, amp):
    real, fake = _accounts('seg', 'tiny', name, amp)
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}
    assert fake['abstract'] and not real['abstract']
    assert fake['precision'] == (amp or 'fp32')
    # the same tensors, attributed to the same modules
    assert fake['saved_by_part'] == real['saved_by_part']
    # the only data-dependent operator: the logged pixel accuracy's mask
    assert {s['op'] for s in fake['substitutions']} <= {'index'}
    assert real['substitutions'] == []


@pytest.mark.parametrize('name', ['full', 'apla-r16', 'lora-r8'])
def test_abstract_account_of_mmseg_vit_and_classifier(name):
    real, fake = _accounts('seg', 'tiny-mmseg', name)
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}
    real, fake = _accounts('backbone', 'tiny', name)
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}
    assert fake['substitutions'] == []  # the classifier has no mask


def test_abstract_model_holds_no_data():
    specs, _ = preset_methods('seg', 'tiny', methods=['apla-r16'])
    trainee = Trainee(specs[0], 2, 64, abstract=True)
    tensors = list(trainee.model.parameters()) + list(
        trainee.model.buffers())
    assert tensors and all(is_fake(t) for t in tensors)
    assert is_fake(trainee.inputs)
    check_all_fake(trainee.model)
    # APLA's rows are fake too, and train
    rows = [p for p in trainee.params if p.dim() == 2 and p.shape[0] == 16]
    assert len(rows) == 4 and all(is_fake(p) for p in rows)
    trainee.train_step()  # a whole step on fake tensors
    assert all(is_fake(s['exp_avg'])
               for s in trainee.optimizer.state.values())
    report = trainee.parameter_report()
    assert report['delta_file_bytes'] is None and report['trainable'] > 0


def test_fake_parameters_keep_structure_and_flags():
    mode = new_fake_mode()
    with fake_parameters(mode):
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
        layer[0].bias.requires_grad_(False)
    assert is_fake(layer[0].weight) and is_fake(layer[1].running_mean)
    assert isinstance(layer[0].weight, nn.Parameter)
    assert layer[0].weight.shape == (4, 8)
    assert not layer[0].bias.requires_grad
    # outside the block modules are real again
    assert not is_fake(nn.Linear(2, 2).weight)
    real = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match='real'):
        check_all_fake(real)


def test_data_dependent_operators_are_answered_and_recorded():
    mode = new_fake_mode()
    compute = AbstractCompute(mode)
    with compute:
        x = torch.empty(2, 3, 5)
        mask = torch.empty(2, 5, dtype=torch.bool)
        picked = x.transpose(1, 2)[mask]  # (2, 5) mask over dims 0, 1
        flat = torch.empty(7)[torch.empty(7, dtype=torch.bool)]
        nz = torch.empty(4, 3).nonzero()
        value = torch.empty((), dtype=torch.bool).item()
    assert picked.shape == (10, 3)  # every mask element assumed true
    assert flat.shape == (7, ) and nz.shape == (12, 2) and value is False
    ops = [s['op'] for s in compute.substitutions]
    assert ops == ['index', 'index', 'nonzero', '_local_scalar_dense']


# ----------------------------------------------------------------------
# AMP and the attention kernel
def test_amp_account_runs_and_halves_activations():
    fp32, _ = _accounts('seg', 'tiny', 'apla-r16')
    bf16, bf16_fake = _accounts('seg', 'tiny', 'apla-r16', amp='bf16')
    assert bf16['weights'] == fp32['weights']  # fp32 master weights
    assert bf16['grads'] == fp32['grads']
    assert bf16['optimizer'] == fp32['optimizer']
    assert bf16['saved'] < 0.85 * fp32['saved']
    assert bf16['precision'] == 'bf16'
    with pytest.raises(ValueError, match='bf16'):
        Trainee(preset_methods('seg', 'tiny', methods=['full'])[0][0], 2, 64,
                amp='fp8')


def test_sdpa_backends_change_what_attention_saves():
    # the classifier preset (timm ViT, F.scaled_dot_product_attention)
    math_real, math_fake = _accounts('backbone', 'tiny', 'full',
                                     sdpa='math')
    flash_real, flash_fake = _accounts('backbone', 'tiny', 'full',
                                       sdpa='flash-cpu')
    auto_real, _ = _accounts('backbone', 'tiny', 'full')
    assert math_fake['saved'] == math_real['saved']
    assert flash_fake['saved'] == flash_real['saved'] == auto_real['saved']
    # the explicit path keeps the N x N attention matrices (instead of the
    # output and the log-sum-exp, which are smaller here: N = 65, d = 32)
    tokens, heads, depth, batch = (64 // 8)**2 + 1, 2, 4, 2
    attention = depth * batch * heads * tokens * tokens * 4
    assert 0.9 * attention < math_real['saved'] - flash_real['saved'] < \
        attention
    # with checkpointing the recomputation runs the same kernel
    cp_real, cp_fake = _accounts('backbone', 'tiny', 'full-cp', sdpa='math')
    assert {k: cp_fake[k] for k in KEYS} == {k: cp_real[k] for k in KEYS}
    assert cp_real['recompute'] > flash_real['recompute']
    # CUDA kernels: counted by their meta functions
    specs, _ = preset_methods('backbone', 'tiny', methods=['full'])
    with pytest.raises(ValueError, match='abstract'):
        Trainee(specs[0], 2, 64, sdpa='flash')
    cp_specs, _ = preset_methods('backbone', 'tiny', methods=['full-cp'])
    for backend in ('flash', 'efficient'):
        for spec in (specs[0], cp_specs[0]):
            t = Trainee(spec, 2, 64, amp='bf16', abstract=True,
                        sdpa=backend)
            assert account_step(t)['saved'] > 0
    assert check_backend('auto', 'cpu', False) == 'auto'
    with pytest.raises(ValueError, match='unknown'):
        SDPABackend('xformers')


# ----------------------------------------------------------------------
# method names with memory options
def test_memory_option_method_names():
    assert parse_method('apla-r64+cp+lean') == dict(
        kind='apla', rank=64, with_cp=False, options=['cp', 'lean'])
    assert parse_method('full+all')['options'] == ['all']
    info = parse_method('apla-r64-cp+all')
    assert resolve_options(info) == ['cp', 'lean', 'heads']
    assert resolve_options(info, amp='bf16') == ['cp', 'lean', 'heads', 'lp']
    assert resolve_options(info, 'bf16', 'VisionTransformer') == [
        'cp', 'lean', 'heads', 'lp', 'sdpa'
    ]
    assert resolve_options(parse_method('full+all'), 'bf16') == [
        'cp', 'lean', 'heads'
    ]
    assert resolve_options(parse_method('frozen+all')) == ['lean', 'heads']
    with pytest.raises(ValueError, match='--amp'):
        resolve_options(parse_method('apla-r8+lp'))
    for bad, match in (('full+lp', 'frozen weights'),
                       ('frozen+cp', 'Drop \\+cp'),
                       ('apla-r8-cp+cp', 'same option'),
                       ('apla-r8+fast', 'unknown option'),
                       ('meta+lean', 'not META'),
                       ('apla-r8+lean+lean', 'repeats')):
        with pytest.raises(ValueError, match=match):
            parse_method(bad)
    assert method_label('apla-r64+cp+lean') == \
        'APLA r=64 + act. ckpt + lean loss'
    assert method_label('full+all') == 'Full fine-tuning + all options'


def test_memory_options_become_the_memory_hook():
    specs, _ = preset_methods('seg', 'tiny',
                              methods=['apla-r16+all', 'full+cp',
                                       'lora-r8+cp+heads'], amp='bf16')
    by = {s.name: s.cfg for s in specs}
    hooks = by['apla-r16+all'].custom_hooks
    assert hooks[0] == dict(type='APLAHook', rank=16, seed=0)
    assert hooks[1] == dict(type='MemoryEfficientHook', lean_loss=True,
                            checkpoint_blocks=True, checkpoint_heads=True,
                            frozen_dtype='bfloat16', fused_attention=False)
    # +cp is one mechanism for every method: the memory option, never the
    # backbone's own switch
    for name in ('full+cp', 'lora-r8+cp+heads', 'apla-r16+all'):
        assert not by[name].model.backbone.get('with_cp')
        assert by[name].custom_hooks[-1]['checkpoint_blocks'] is True
    assert by['lora-r8+cp+heads'].custom_hooks[1]['checkpoint_heads']
    specs, _ = preset_methods('seg', 'tiny-mmseg', methods=['apla-r16+all'])
    assert specs[0].cfg.custom_hooks[1]['fused_attention'] is True
    assert specs[0].cfg.custom_hooks[1]['frozen_dtype'] is None


def test_larger_presets_scale_every_width():
    specs, preset = preset_methods('seg', 'dinov2-g14', methods=['full'])
    model = specs[0].cfg.model
    assert preset['size'] == 518 and preset['crop'] == 512
    assert model.backbone.model_name == 'vit_giant_patch14_dinov2'
    assert model.backbone.out_indices == (9, 19, 29, 39)
    assert model.neck.in_channels == [1536] * 4
    assert model.decode_head.in_channels == [1536] * 4
    assert model.auxiliary_head.in_channels == 1536
    assert model.data_preprocessor.size == (518, 518)
    specs, preset = preset_methods('seg', 'vit-l16', methods=['full'])
    assert specs[0].cfg.model.neck.out_channels == 1024
    assert preset['size'] == 512


# ----------------------------------------------------------------------
# the planner
def test_parse_memory():
    assert parse_memory('24GB') == parse_memory('24 GiB') == 24 * 2**30
    assert parse_memory('512MB') == 512 * 2**20
    assert parse_memory('1.5g') == int(1.5 * 2**30)
    assert parse_memory('8') == 8 * 2**30
    with pytest.raises(ValueError, match='24GB'):
        parse_memory('lots')


@pytest.fixture(scope='module')
def plan_cache(tmp_path_factory):
    """One account cache for the planner tests (each account once)."""
    return str(tmp_path_factory.mktemp('plan_cache'))


def _opts(memory, cache_dir, **kw):
    return PlanOptions(source='seg/tiny', memory=memory, ranks=[8, 32],
                       ladder=[(), ('cp', )], reserve=0, cache_dir=cache_dir,
                       **kw)


def test_planner_figures_are_the_accounts(plan_cache):
    planner = Planner(_opts(2**30, plan_cache))
    # the affine batch model reproduces the account at another batch
    for name in ('apla-r8', 'apla-r8+cp', 'full'):
        specs, _ = preset_methods('seg', 'tiny', methods=[name])
        real = account_step(Trainee(specs[0], 5, 64))
        assert planner.total(name, 5) == real['total']
    # the activations do not depend on APLA's rank; the static part does
    r8, r32 = planner.account('apla-r8', 2), planner.account('apla-r32', 2)
    assert r8['saved'] == r32['saved'] and r8['grads'] < r32['grads']
    static = planner.static('apla-r32')
    assert {k: static[k] for k in ('weights', 'grads', 'optimizer')} == {
        k: r32[k] for k in ('weights', 'grads', 'optimizer')}
    # parameters (what FSDP shards) are the weights less the buffers
    assert 0 < static['params'] <= static['weights']
    assert planner.total('apla-r8', 2, static_name='apla-r32') == \
        r32['total']


def test_planner_answers(plan_cache):
    roomy = plan(_opts(2**30, plan_cache))
    assert all(r['fits'] for r in roomy['rows'])
    best = roomy['best']
    # nothing recomputed, the largest rank
    assert best['method'] == 'apla-r32' and best['max_batch'] == 32
    assert roomy['full']['total'] > best['total']
    text = format_plan(roomy)
    assert 'Recommended' in text and '`apla-r32+cp`' in text
    assert 'Stock full fine-tuning needs' in text

    # between APLA with checkpointing and APLA without at batch 2
    specs, _ = preset_methods('seg', 'tiny', methods=['apla-r8+cp',
                                                      'apla-r8'])
    cp, plain = (account_step(Trainee(s, 2, 64))['total'] for s in specs)
    tight = plan(_opts((cp + plain) // 2, plan_cache))
    assert tight['best']['options'] == ['cp']
    assert not any(r['fits'] for r in tight['rows']
                   if r['kind'] == 'apla' and not r['options'])
    assert not tight['full']['fits']
    assert 'does not fit' in format_plan(tight)

    none = plan(_opts(2**20, plan_cache))
    assert none['best'] is None and 'No APLA setting fits' in \
        format_plan(none)
    with pytest.raises(ValueError, match='reserve'):
        plan(PlanOptions(source='seg/tiny', memory=2**20, reserve=2**21))
    with pytest.raises(ValueError, match='detector'):
        plan(PlanOptions(source='det/tiny', memory=2**30))
    with pytest.raises(FileNotFoundError, match='presets'):
        plan(PlanOptions(source='seg/nothing', memory=2**30))


def test_planner_cache_answers_again_without_computing(tmp_path):
    first = plan(PlanOptions(source='seg/tiny', memory=2**30, ranks=[8],
                             ladder=[()], reserve=0,
                             cache_dir=str(tmp_path)))
    assert first['accounts_computed'] > 0
    again = plan(PlanOptions(source='seg/tiny', memory=2**20, ranks=[8],
                             ladder=[()], reserve=0,
                             cache_dir=str(tmp_path)))
    assert again['accounts_computed'] == 0
    assert again['full']['total'] == first['full']['total']


@pytest.mark.slow
def test_plan_cli_on_a_config_file(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    config = ('configs/apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_'
              'toyseg-64x64.py')
    proc = subprocess.run(
        [sys.executable, 'tools/plan.py', config, '--memory', '40MB',
         '--ranks', '8', '--ladder', 'none,cp', '--reserve', '0',
         '--cache-dir', str(tmp_path),
         '--json', str(tmp_path / 'plan.json')],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Stock full fine-tuning needs' in proc.stdout
    assert (tmp_path / 'plan.json').is_file()


def test_apply_method_refuses_lp_without_amp():
    specs, _ = preset_methods('seg', 'tiny', methods=['full'])
    with pytest.raises(ValueError, match='--amp'):
        apply_method(specs[0].cfg, 'apla-r8+lp', 'seg')


def test_benchmark_reports_precisions_and_the_abstract_check(tmp_path):
    from apla_mm.benchmark import BenchmarkOptions, run_benchmark
    from apla_mm.benchmark.report import markdown
    results = run_benchmark(
        BenchmarkOptions(task='seg', model='tiny',
                         methods=['full', 'apla-r16-cp'], timing=False,
                         peak=False, progress=False, threads=1,
                         precisions=['fp32', 'bf16'], check_abstract=True))
    for r in results['methods']:
        assert set(r['accounts']) == {'fp32', 'bf16'}
        for check in r['abstract_check'].values():
            assert check['rel_diff'] == 0 and check['differing'] == []
        assert r['ratios']['memory_bf16'] > 0
    md = markdown(results)
    assert '## Training memory, bf16 autocast' in md
    assert '## Abstract account vs real account' in md
    with pytest.raises(ValueError, match='--no-timing --no-peak'):
        run_benchmark(BenchmarkOptions(task='seg', model='tiny',
                                       abstract=True, progress=False))


# ----------------------------------------------------------------------
# the memory options (apla_mm.memory) in the benchmark
@pytest.mark.parametrize('model,name', [
    ('tiny', 'full+all'), ('tiny', 'apla-r16+lean'),
    ('tiny', 'apla-r16+heads'), ('tiny', 'apla-r16+all'),
    ('tiny', 'lora-r8+all'), ('tiny-mmseg', 'apla-r16+sdpa')])
def test_memory_options_abstract_equals_real(model, name):
    real, fake = _accounts('seg', model, name)
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}


def test_memory_options_save_what_they_should():
    stock, _ = _accounts('seg', 'tiny', 'apla-r16')
    lean, _ = _accounts('seg', 'tiny', 'apla-r16+lean')
    heads, _ = _accounts('seg', 'tiny', 'apla-r16+heads')
    every, _ = _accounts('seg', 'tiny', 'apla-r16+all')
    for a in (lean, heads, every):
        assert a['weights'] == stock['weights']
        assert a['grads'] == stock['grads']
    # the decode head's and the auxiliary head's saved bytes shrink
    part = {g['where']: g['bytes'] for g in stock['saved_by_part']}
    lean_part = {g['where']: g['bytes'] for g in lean['saved_by_part']}
    assert lean_part['decode_head'] < part['decode_head']
    assert lean_part['auxiliary_head'] < part['auxiliary_head']
    assert lean_part['backbone'] == part['backbone']
    assert heads['checkpointed_regions'] > 0
    assert every['total'] < min(lean['total'], heads['total'])
    mmseg, _ = _accounts('seg', 'tiny-mmseg', 'apla-r16')
    fused, _ = _accounts('seg', 'tiny-mmseg', 'apla-r16+sdpa')
    assert fused['saved'] < mmseg['saved']


def test_timed_run_with_abstract_accounts():
    from apla_mm.benchmark import BenchmarkOptions, run_benchmark
    common = dict(task='seg', model='tiny', methods=['full', 'apla-r16'],
                  steps=1, warmup=0, peak=False, progress=False, threads=1)
    real = run_benchmark(BenchmarkOptions(**common, timing=False))
    timed = run_benchmark(BenchmarkOptions(**common, abstract_accounts=True))
    for r, t in zip(real['methods'], timed['methods']):
        assert t['memory']['abstract'] and not r['memory']['abstract']
        assert t['memory']['total'] == r['memory']['total']
        assert t['train_time']['n'] == 1 and t['params'] == r['params']


def test_low_precision_frozen_weights_abstract_equals_real():
    plain, _ = _accounts('seg', 'tiny', 'apla-r16', amp='bf16')
    real, fake = _accounts('seg', 'tiny', 'apla-r16+lp', amp='bf16')
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}
    # frozen ViT weights stored in bf16: fewer weight bytes, same grads
    assert real['weights'] < plain['weights']
    assert real['grads'] == plain['grads']
    real, fake = _accounts('seg', 'tiny', 'apla-r16+all', amp='bf16')
    assert {k: fake[k] for k in KEYS} == {k: real[k] for k in KEYS}


def test_step_flops_real_equal_abstract_and_frozen_is_the_floor():
    from apla_mm.benchmark import BenchmarkOptions, run_benchmark
    from apla_mm.benchmark.report import markdown
    common = dict(task='seg', model='tiny',
                  methods=['full', 'frozen', 'apla-r16', 'apla-r16-cp'],
                  timing=False, peak=False, progress=False, threads=1,
                  flops=True)
    real = {r['name']: r['flops'] for r in
            run_benchmark(BenchmarkOptions(**common))['methods']}
    fake_results = run_benchmark(BenchmarkOptions(abstract=True, **common))
    fake = {r['name']: r['flops'] for r in fake_results['methods']}
    assert fake == real
    full, frozen, apla, cp = (real[k] for k in ('full', 'frozen', 'apla-r16',
                                                'apla-r16-cp'))
    # the same forward; backward: frozen floor < APLA < full fine-tuning
    assert full['forward'] == frozen['forward'] == apla['forward']
    assert frozen['backward'] < apla['backward'] < full['backward']
    parts = full['forward_by_part']
    for other in (frozen, apla, cp):
        assert other['forward_by_part'] == parts
    # checkpointing recomputes (part of: non-reentrant checkpointing stops
    # once the saved tensors are back) the blocks' forward in backward
    recomputed = cp['backward'] - apla['backward']
    assert 0 < recomputed
    if FLOPS_PER_MODULE:
        assert set(parts) == {'backbone', 'neck', 'decode_head',
                              'auxiliary_head'}
        assert all(p > 0 for p in parts.values())
        assert sum(parts.values()) <= full['forward']
        assert recomputed < parts['backbone']
    else:  # torch 2.1: totals only
        assert parts == {}
    assert cp['forward'] == apla['forward']
    ratios = {r['name']: r['ratios']['flops']
              for r in fake_results['methods']}
    assert ratios['full'] == 1 and ratios['frozen'] < ratios['apla-r16'] < 1
    assert '## Arithmetic of a training step' in markdown(fake_results)
