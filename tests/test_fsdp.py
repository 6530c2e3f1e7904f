"""FSDP through mmengine's FlexibleRunner and apla_mm's PortableFSDPStrategy:
the wrap plan, and 2-process CPU runs (gloo) through tools/dist_train.sh
compared with DDP runs of the same config."""
import os.path as osp

import pytest
import torch
import torch.nn as nn

from apla_mm.compat import TorchTooOld, check_fsdp_device, fsdp_runs_on_cpu
from apla_mm.engine.strategies import frozen_apart_wrap_plan
from apla_mm.testing import REPO_ROOT, run_tool
from test_distributed import _free_port, _options

FULL = 'finetune/upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
FROZEN = 'finetune/frozen_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
BLOCK = 'TransformerEncoderLayer'
#: FSDP vs DDP after 4 AdamW steps in fp32. They reduce gradients
#: differently (reduce-scatter of flat shards vs bucketed all-reduce), so
#: rounding may differ; on torch 2.13.0 with gloo the weights came out
#: bit-identical (measured max difference 0.0).
ATOL = 1e-5

needs_cpu_fsdp = pytest.mark.skipif(
    not fsdp_runs_on_cpu(),
    reason='FSDP on CPUs fails on this torch (apla_mm.compat.'
    'fsdp_runs_on_cpu); checked to work on torch 2.13.0')


# -- the wrap plan (no processes) ---------------------------------------------
def _toy_model(config, scope='mmseg'):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(cfg.model)


def _units_params(model, plan):
    """Parameter name -> the unit that owns it ('' for the root)."""
    owner = {}
    for name, _ in model.named_parameters():
        parts = name.split('.')
        prefixes = ['.'.join(parts[:i]) for i in range(len(parts), 0, -1)]
        owner[name] = next((p for p in prefixes if p in plan), '')
    return owner


def test_plan_keeps_a_frozen_backbone_apart():
    model = _toy_model(FROZEN)
    plan = frozen_apart_wrap_plan(model, [BLOCK])
    params = dict(model.named_parameters())
    owner = _units_params(model, plan)
    # no unit mixes frozen and trainable parameters
    kinds = {}
    for name, unit in owner.items():
        kinds.setdefault(unit, set()).add(params[name].requires_grad)
    assert all(len(flags) == 1 for flags in kinds.values()), kinds
    # every frozen parameter sits in a frozen unit, never in the root
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert frozen and all(n.startswith('backbone.') for n in frozen)
    assert all(plan[owner[n]] == 'frozen' for n in frozen)
    assert plan['backbone.layers.0'] == 'frozen'
    # heads are entered through loss()/predict(): never units themselves;
    # containers are never called
    assert 'decode_head' not in plan and 'auxiliary_head' not in plan
    assert 'decode_head.lateral_convs' not in plan
    assert plan['decode_head.conv_seg'] == 'trainable'
    # nn.MultiheadAttention reads out_proj's weight itself
    assert not any(n.endswith('out_proj') for n in plan)


def test_plan_full_finetuning_wraps_the_blocks_only():
    model = _toy_model(FULL)
    assert frozen_apart_wrap_plan(model, [BLOCK]) == {
        f'backbone.layers.{i}': 'trainable'
        for i in range(4)
    }
    # size rule instead of classes
    assert frozen_apart_wrap_plan(model, min_num_params=10**9) == {}


def test_plan_keeps_a_mixed_module_as_small_as_possible():
    """A module whose own parameters mix (APLA's W_O beside its rows) is a
    unit of its own; its frozen siblings are frozen units."""

    class Block(nn.Module):

        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.proj = nn.Linear(8, 8)
            self.proj.rows = nn.Parameter(torch.zeros(2, 8))
            self.mlp = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8))

    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    model[:2].requires_grad_(False)
    for block in model[:2]:
        block.proj.rows.requires_grad_(True)
    plan = frozen_apart_wrap_plan(model, ['Block'])
    for i in (0, 1):
        assert plan[f'{i}.proj'] == 'mixed'
        assert plan[f'{i}.qkv'] == plan[f'{i}.mlp'] == 'frozen'
        assert f'{i}' not in plan  # nothing left to own
    assert plan['2'] == 'trainable'


def test_check_fsdp_device_says_what_this_torch_can_do():
    check_fsdp_device(torch.device('cuda'))  # not decided here
    if fsdp_runs_on_cpu():
        check_fsdp_device(torch.device('cpu'))
    else:
        with pytest.raises(TorchTooOld, match='FullyShardedDataParallel'):
            check_fsdp_device(torch.device('cpu'))


# -- 2 processes ------------------------------------------------------------------
PROBE = '''
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


@HOOKS.register_module()
class FSDPProbeHook(Hook):
    """Records the plain state dict before training and, at the first
    optimizer step, each FSDP unit's parameters and gradient storage."""
    priority = 'LOWEST'

    def before_train(self, runner):
        model = runner.model
        self.units = []
        # (cloned inside: the root's gathered tensors are freed on exit)
        if isinstance(model, FSDP):
            with FSDP.summon_full_params(model, recurse=False,
                                         writeback=False):
                self.before = self._clone(model.module.state_dict())
        else:
            self.before = self._clone(
                getattr(model, 'module', model).state_dict())
        runner.optim_wrapper.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self._units(model))

    @staticmethod
    def _clone(state):
        return {k: v.detach().clone() for k, v in state.items()}

    def _units(self, model):
        if self.units or not isinstance(model, FSDP):
            return
        for unit in FSDP.fsdp_modules(model):
            flat = unit._handle.flat_param if unit._handle else None
            if flat is None:
                continue
            self.units.append(dict(
                fqns=list(flat._fqns),
                flags=[p.requires_grad for p in flat._params],
                numel=flat.numel(), requires_grad=flat.requires_grad,
                grad=None if flat.grad is None else flat.grad.numel()))

    def after_train(self, runner):
        torch.save(dict(before=self.before, units=self.units,
                        wrapper=type(runner.model).__name__),
                   osp.join(runner.work_dir, f'probe{get_rank()}.pth'))
'''


def _config(tmp_path, base, fsdp):
    (tmp_path / 'fsdp_probe.py').write_text(PROBE)
    name = ('fsdp_' if fsdp else 'ddp_') + osp.basename(base)
    lines = [
        f"_base_ = ['{osp.join(REPO_ROOT, 'configs', base)}']",
        "custom_imports = dict(imports=['apla_mm', 'fsdp_probe'], "
        'allow_failed_imports=False)',
        "custom_hooks = [dict(type='FSDPProbeHook')]",
    ]
    if fsdp:
        lines += [
            "runner_type = 'FlexibleRunner'",
            "strategy = dict(type='PortableFSDPStrategy', "
            f"wrap_module_classes=['{BLOCK}'])",
        ]
    path = tmp_path / name
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def _train(tmp_path, config, work, root, iters, *extra):
    env = dict(OMP_NUM_THREADS='1', PORT=str(_free_port()),
               PYTHONPATH=str(tmp_path))
    load = [] if '--resume' in extra else [
        f"load_from={tmp_path / 'initial.pth'}"]
    return run_tool([
        'bash', 'tools/dist_train.sh', config, '2', '--work-dir', work,
        *extra, *_options(root, iters), *load
    ], env=env)


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _plain_keys():
    return set(_toy_model(FULL).state_dict())


def _initial_checkpoint(tmp_path, config):
    """A seeded initialisation of the plain model, for ``load_from``: FSDP
    and DDP runs start from the same weights (FlexibleRunner builds the
    model later than Runner, after other random draws)."""
    torch.manual_seed(0)
    model = _toy_model(config)
    model.init_weights()
    path = str(tmp_path / 'initial.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return path


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_full_finetuning_equals_ddp_and_checkpoints_stay_plain(
        toy_seg_root, tmp_path):
    initial = _state(_initial_checkpoint(tmp_path, FULL))['state_dict']
    fsdp_cfg = _config(tmp_path, FULL, fsdp=True)
    fsdp = str(tmp_path / 'fsdp')
    log = _train(tmp_path, fsdp_cfg, fsdp, toy_seg_root, 4)
    assert '4 FSDP units below the root: 0 frozen, 4 trainable' in log
    ddp = str(tmp_path / 'ddp')
    _train(tmp_path, _config(tmp_path, FULL, fsdp=False), ddp, toy_seg_root,
           4)
    probe_fsdp = _state(osp.join(fsdp, 'probe0.pth'))
    probe_ddp = _state(osp.join(ddp, 'probe0.pth'))
    assert probe_fsdp['wrapper'] == 'MMFullyShardedDataParallel'
    assert probe_ddp['wrapper'] == 'MMDistributedDataParallel'

    # the checkpoint is the plain model's full state dict
    ckpt = _state(osp.join(fsdp, 'iter_4.pth'))
    weights = ckpt['state_dict']
    assert set(weights) == _plain_keys()
    # ... and optimizer state keyed by the plain parameter names
    assert set(ckpt['optimizer']['state']) <= set(weights)

    # the same start, and the same weights as DDP after 4 steps
    for key, value in initial.items():
        assert torch.equal(probe_fsdp['before'][key], value), key
        assert torch.equal(probe_ddp['before'][key], value), key
    ddp_weights = _state(osp.join(ddp, 'iter_4.pth'))['state_dict']
    worst = max((weights[k].float() - v.float()).abs().max().item()
                for k, v in ddp_weights.items())
    assert worst <= ATOL, worst
    moved = [k for k, v in probe_ddp['before'].items()
             if not torch.equal(v, weights[k])]
    assert len(moved) > 100

    # --resume from iteration 2 ends where the uninterrupted run ended
    resumed = str(tmp_path / 'resumed')
    log = _train(tmp_path, fsdp_cfg, resumed, toy_seg_root, 4, '--resume',
                 osp.join(fsdp, 'iter_2.pth'))
    assert 'resumed epoch: 0, iter: 2' in log
    again = _state(osp.join(resumed, 'iter_4.pth'))['state_dict']
    for key, value in weights.items():
        if 'running_' in key:  # BatchNorm statistics: measured <= 1e-4
            assert torch.allclose(again[key], value, rtol=1e-3,
                                  atol=1e-3), key
        else:
            assert torch.allclose(again[key], value, atol=ATOL, rtol=0), key

    # tools/test.py opens it with the plain base config (the FSDP config
    # opens it too: on one process the strategy runs the model unsharded;
    # checked by hand, left out for time)
    log = run_tool([
        'tools/test.py', osp.join(REPO_ROOT, 'configs', FULL),
        osp.join(fsdp, 'iter_4.pth'), '--work-dir', str(tmp_path / 'test'),
        '--cfg-options', f'test_dataloader.dataset.data_root={toy_seg_root}'
    ], env=dict(OMP_NUM_THREADS='1'))
    assert 'mIoU' in log and 'fits the model only partly' not in log


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_frozen_backbone_gets_no_gradient_memory(toy_seg_root,
                                                       tmp_path):
    initial = _state(_initial_checkpoint(tmp_path, FROZEN))['state_dict']
    work = str(tmp_path / 'frozen')
    log = _train(tmp_path, _config(tmp_path, FROZEN, fsdp=True), work,
                 toy_seg_root, 2)
    assert '0 mixed' in log
    model = _toy_model(FROZEN)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    shard_grads = 0
    for rank in (0, 1):
        units = _state(osp.join(work, f'probe{rank}.pth'))['units']
        assert len(units) > 10
        for unit in units:
            # no unit mixes; an all-frozen unit has no gradient at all
            assert len(set(unit['flags'])) <= 1, unit['fqns']
            if unit['flags'] and not unit['flags'][0]:
                assert not unit['requires_grad'] and unit['grad'] is None
            elif unit['grad'] is not None:
                assert unit['grad'] == unit['numel']
                shard_grads += unit['grad']
    # the gradient shards of both ranks hold the trainable parameters
    # (FSDP pads each flat parameter to a multiple of the world size)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    need = sum(numel[n] for n in trainable)
    assert need <= shard_grads <= need + 2 * len(units)

    # frozen entries bit-identical, trainable ones trained
    probe = _state(osp.join(work, 'probe0.pth'))
    after = _state(osp.join(work, 'iter_2.pth'))['state_dict']
    for name in frozen:
        assert torch.equal(initial[name], probe['before'][name]), name
        assert torch.equal(initial[name], after[name]), name
    assert all(not torch.equal(probe['before'][n], after[n])
               for n in trainable if n.endswith('conv_seg.weight'))


# -- the planner's sharded mode -------------------------------------------------
def test_planner_shards_parameters_gradients_and_optimizer_state():
    """``tools/plan.py --gpus 8 --strategy fsdp`` on the toy UperNet against
    hand arithmetic: per GPU, parameters, gradients and AdamW's two moments
    divided by 8 (rounded up), buffers and activations whole."""
    from apla_mm.benchmark.planner import GiB, PlanOptions, plan
    config = osp.join(REPO_ROOT, 'configs', FULL)
    common = dict(source=config, memory=GiB, reserve=GiB // 10, batch=2,
                  batches=(2, ), ranks=(16, ), ladder=[()], cache_dir=None)
    one = plan(PlanOptions(**common))
    fsdp = plan(PlanOptions(**common, gpus=8, strategy='fsdp'))
    # the toy model by hand: a 64-d, 4-block ViT with patch 8 on 64 px
    # (tests/test_configs.py: vit_params) + neck + decode + auxiliary heads
    tokens, dim = (64 // 8)**2 + 1, 64
    block = (2 * 2 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim +
             8 * dim * dim + 4 * dim + dim)
    vit = 3 * 8 * 8 * dim + dim + tokens * dim + 4 * block
    heads = 164_352 + 472_901 + 18_661
    n = vit + heads
    # APLA r=16: 16 rows of 64 inputs + 16 biases in each block's W_O,
    # parameters beside the frozen W_O
    rows = 4 * (16 * dim + 16)
    params = {'full': n, 'apla-r16': n + rows}
    trained = {'full': n, 'apla-r16': rows + heads}
    for row_one, row in zip(one['rows'], fsdp['rows']):
        static, method = row['static'], row['method']
        assert static == row_one['static']
        assert static['params'] == 4 * params[method]
        assert static['grads'] == 4 * trained[method]
        assert static['optimizer'] == 8 * trained[method]
        buffers = static['weights'] - static['params']
        assert buffers > 0  # BatchNorm statistics: not sharded
        per_gpu = (buffers + -(-4 * params[method] // 8) +
                   -(-4 * trained[method] // 8) + -(-8 * trained[method] // 8))
        assert row['static_per_gpu'] == per_gpu
        # activations are the same per GPU
        assert row['total'] - per_gpu == row_one['total'] - (
            static['weights'] + static['grads'] + static['optimizer'])
        assert row['total'] < row_one['total']


@pytest.mark.parametrize('method', ['apla', 'lora'])
def test_peft_layers_let_fsdp_replace_their_parameters(method):
    """APLA's and LoRA's class swaps expose weights as properties with
    setters (apla_mm.peft.swap.parameter_property), so FSDP1 can replace
    parameters by views and back; a read-only property elsewhere is still
    refused before wrapping."""
    from apla_mm.engine.strategies.fsdp import check_settable_parameters
    from apla_mm.peft import adapter_class
    model = _toy_model(FULL)
    cls = adapter_class(method)
    settings = dict(rank=8) if method == 'lora' else dict(rank=16, seed=0)
    cls(model, cls.config_class.from_kwargs('test', **settings))
    check_settable_parameters(model)
    module = model.backbone.layers[0].attn.attn
    name = 'in_proj_weight' if method == 'lora' else None
    if name is None:
        module, name = module.out_proj, 'weight'
    param = module._parameters[name]
    # what FSDP does: delattr, setattr(view), ..., delattr, setattr(param)
    delattr(module, name)
    assert not hasattr(module, name)
    view = param.detach().view(-1).view(param.shape)
    setattr(module, name, view)
    assert name not in module._parameters and module.__dict__[name] is view
    delattr(module, name)
    setattr(module, name, param)
    assert module._parameters[name] is param and name not in module.__dict__

    class ReadOnly(nn.Module):
        weight = property(lambda self: self._parameters['weight'])

        def __init__(self):
            super().__init__()
            self._parameters['weight'] = nn.Parameter(torch.zeros(2))

    with pytest.raises(RuntimeError, match='read-only property'):
        check_settable_parameters(nn.Sequential(ReadOnly()))


PEFT_SETTINGS = {'apla': "method='apla', rank=16, seed=0",
                 'lora': "method='lora', rank=4, alpha=8, seed=0"}


def _peft_config(tmp_path, method, fsdp):
    """The toy config with the method applied at build time (PEFTModel, the
    route FlexibleRunner needs) and PEFTHook for the checkpoint meta."""
    (tmp_path / 'fsdp_probe.py').write_text(PROBE)
    lines = [
        f"_base_ = ['{osp.join(REPO_ROOT, 'configs', FULL)}']",
        "custom_imports = dict(imports=['apla_mm', 'fsdp_probe'], "
        'allow_failed_imports=False)',
        "custom_hooks = [dict(type='FSDPProbeHook'), dict(type='PEFTHook')]",
        "model = dict(_delete_=True, type='PEFTModel', model=_base_.model, "
        f'{PEFT_SETTINGS[method]})',
    ]
    if fsdp:
        lines += [
            "runner_type = 'FlexibleRunner'",
            "strategy = dict(type='PortableFSDPStrategy', "
            f"wrap_module_classes=['{BLOCK}'])",
        ]
    path = tmp_path / f"{'fsdp' if fsdp else 'ddp'}_{method}.py"
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


@pytest.mark.slow
@needs_cpu_fsdp
@pytest.mark.parametrize('method', ['apla', 'lora'])
def test_fsdp_peft_equals_ddp_and_checkpoints_stay_plain(
        method, toy_seg_root, tmp_path):
    from apla_mm.testing import assert_apla_trained
    initial = _state(_initial_checkpoint(tmp_path, FULL))['state_dict']
    runs = {}
    for fsdp in (True, False):
        work = str(tmp_path / ('fsdp' if fsdp else 'ddp'))
        _train(tmp_path, _peft_config(tmp_path, method, fsdp), work,
               toy_seg_root, 3)
        runs[fsdp] = _state(osp.join(work, 'iter_3.pth'))
    fsdp_ckpt, ddp_ckpt = runs[True], runs[False]
    weights = fsdp_ckpt['state_dict']
    meta = fsdp_ckpt['meta']['apla_mm']
    assert meta == ddp_ckpt['meta']['apla_mm']
    worst = max((weights[k].float() - v.float()).abs().max().item()
                for k, v in ddp_ckpt['state_dict'].items())
    assert worst <= ATOL, worst
    if method == 'apla':
        # plain keys, merged W_O: frozen entries bit-identical, rows moved
        assert set(weights) == _plain_keys()
        indices = {name: info['index']
                   for name, info in meta['layers'].items()}
        assert assert_apla_trained(initial, weights, indices) == 8
    else:
        # the plain keys plus the factors; the base weights untouched
        assert set(weights) - _plain_keys() == {
            f'{layer}.{f}' for layer in meta['layers']
            for f in ('lora_A', 'lora_B')}
        for key in _plain_keys():
            if key.startswith('backbone.'):
                assert torch.equal(weights[key], initial[key]), key
        assert any(weights[f'{layer}.lora_B'].abs().sum() > 0
                   for layer in meta['layers'])
    # the delta keeps only what trained, and merges back into the start
    from apla_mm.peft.delta import export_delta, merge_delta
    delta = export_delta(fsdp_ckpt)
    merged = merge_delta(initial, delta)
    for key in _plain_keys():
        expected = weights[key]
        if method == 'lora' and key in merged and key.startswith('backbone.'):
            continue  # merging folds the factors into the weights
        assert torch.equal(merged[key], expected), key
    if method == 'apla':
        # tools/test.py opens the FSDP run's checkpoint with the plain base
        # config (no PEFT, no FSDP)
        fsdp_work = str(tmp_path / 'fsdp')
        log = run_tool([
            'tools/test.py', osp.join(REPO_ROOT, 'configs', FULL),
            osp.join(fsdp_work, 'iter_3.pth'), '--work-dir',
            str(tmp_path / 'test'), '--cfg-options',
            f'test_dataloader.dataset.data_root={toy_seg_root}'
        ], env=dict(OMP_NUM_THREADS='1'))
        assert 'mIoU' in log and 'fits the model only partly' not in log


DET_APLA = ('apla/apla-r16_mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_'
            'toycoco-128x128.py')


@pytest.mark.slow
@needs_cpu_fsdp
def test_fsdp_apla_mask_rcnn(toy_coco_root, tmp_path):
    """mmdet's Mask R-CNN (timm ViT + simple FPN) under FSDP with APLA
    applied at build time: frozen entries bit-identical, rows moved, a plain
    checkpoint with the APLA meta."""
    from apla_mm.testing import assert_apla_trained
    config = tmp_path / 'fsdp_det.py'
    config.write_text('\n'.join([
        f"_base_ = ['{osp.join(REPO_ROOT, 'configs', DET_APLA)}']",
        "model = dict(_delete_=True, type='PEFTModel', model=_base_.model, "
        "method='apla', rank=16, seed=0)",
        "custom_hooks = [dict(type='PEFTHook')]",
        "runner_type = 'FlexibleRunner'",
        "strategy = dict(type='PortableFSDPStrategy', "
        "wrap_module_classes=['Block'])",
    ]) + '\n')
    torch.manual_seed(0)
    model = _toy_model(DET_APLA.replace('apla/apla-r16_', 'finetune/'),
                       scope='mmdet')
    model.init_weights()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(dict(state_dict=initial, meta={}), tmp_path / 'initial.pth')
    ann = f'{toy_coco_root}/annotations/instances_val.json'
    work = str(tmp_path / 'work')
    log = run_tool([
        'bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', work,
        '--cfg-options', f'train_dataloader.dataset.data_root={toy_coco_root}',
        f'val_dataloader.dataset.data_root={toy_coco_root}',
        f'val_evaluator.ann_file={ann}', 'train_dataloader.batch_size=2',
        'train_cfg.max_iters=2', 'train_cfg.val_interval=3',
        f"load_from={tmp_path / 'initial.pth'}"
    ], env=dict(OMP_NUM_THREADS='1', PORT=str(_free_port())))
    assert 'FSDP units below the root' in log
    ckpt = _state(osp.join(work, 'iter_2.pth'))
    assert set(ckpt['state_dict']) == set(initial)
    meta = ckpt['meta']['apla_mm']
    indices = {n: info['index'] for n, info in meta['layers'].items()}
    assert assert_apla_trained(initial, ckpt['state_dict'], indices) == 8
