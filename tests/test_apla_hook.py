"""APLAHook inside mmengine's Runner (toy UperNet), with any optimizer wrapper."""
import glob
import json
import os.path as osp

import pytest
import torch

from apla_mm.engine import APLAHook
from apla_mm.peft.utils import unwrap_model
from apla_mm.testing import (ParamSnapshotHook, assert_apla_trained,
                             build_runner, short_run_cfg)

CONFIGS = {
    'timm': 'apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
    'mmseg': 'apla/apla-r16_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
}
BASES = {
    'timm': 'finetune/upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
    'mmseg': 'finetune/upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
}

# Optimizer settings under which masking gradients alone would move frozen
# entries (decoupled weight decay, momentum), plus clipping, accumulation and
# mixed precision.
SCENARIOS = {
    'adamw_wd': dict(optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.5)),
    'sgd_momentum': dict(
        optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=0.1)),
    'clip_grad': dict(
        optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.1),
        clip_grad=dict(max_norm=0.1)),
    'accumulation': dict(
        optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.1),
        accumulative_counts=2),
    'amp': dict(
        type='PortableAmpOptimWrapper',  # mmengine's AmpOptimWrapper, bf16 on CPU
        optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.1)),
    'deprecated_apla_amp_wrapper': dict(
        type='APLAAmpOptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-2, weight_decay=0.1)),
}


def _apla_hook(runner) -> APLAHook:
    return next(h for h in runner.hooks if isinstance(h, APLAHook))


@pytest.mark.parametrize('scenario', sorted(SCENARIOS))
@pytest.mark.parametrize('family', ['timm', 'mmseg'])
def test_frozen_entries_bit_identical(family, scenario, toy_seg_root,
                                      tmp_path):
    cfg = short_run_cfg(
        CONFIGS[family], str(tmp_path), toy_seg_root, max_iters=4,
        batch_size=2)
    for key, value in SCENARIOS[scenario].items():
        cfg.optim_wrapper[key] = value  # replace, not merge
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    adapter = _apla_hook(runner).adapter
    assert len(adapter.layers) == 4
    # weight and bias of each adapted layer checked row by row
    assert assert_apla_trained(snapshot.before, snapshot.after,
                               adapter.indices()) == 8
    # neck and heads train as usual
    assert any(
        not torch.equal(v, snapshot.after[k])
        for k, v in snapshot.before.items() if k.startswith('decode_head'))


def test_no_gradients_or_state_for_frozen_parameters(toy_seg_root, tmp_path):
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=2,
        batch_size=2)
    runner = build_runner(cfg)
    runner.train()
    model = unwrap_model(runner.model)
    adapter = _apla_hook(runner).adapter
    optimizer = runner.optim_wrapper.optimizer
    in_optimizer = {
        id(p)
        for group in optimizer.param_groups for p in group['params']
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert in_optimizer == {id(p) for p in trainable}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
            assert p not in optimizer.state, name
    row_states = [
        optimizer.state[p]['exp_avg'].shape
        for p in adapter.adapted_parameters()
    ]
    assert row_states == [torch.Size([16, 64]), torch.Size([16])] * 4
    # paramwise settings survive the move onto the rows
    wo_groups = [
        g for g in optimizer.param_groups
        if any(p is adapter.layers[0].trainable_parameters()[0]
               for p in g['params'])
    ]
    assert len(wo_groups) == 1 and wo_groups[0]['weight_decay'] == 0.01


def test_report_meta_index_file_and_plain_checkpoint(toy_seg_root, tmp_path):
    cfg = short_run_cfg(
        CONFIGS['mmseg'], str(tmp_path), toy_seg_root, max_iters=2,
        batch_size=2, log_level='INFO')
    runner = build_runner(cfg)
    runner.train()
    adapter = _apla_hook(runner).adapter
    model = unwrap_model(runner.model)
    heads = sum(
        p.numel() for n, p in model.named_parameters()
        if not n.startswith('backbone'))
    base_total = sum(
        p.numel() for n, p in model.named_parameters()
        if 'apla_' not in n)
    assert adapter.num_trainable() == 4 * 16 * (64 + 1)
    log = open(glob.glob(osp.join(str(tmp_path), '*', '*.log'))[0]).read()
    expected = (f'trainable params: {adapter.num_trainable() + heads:,} || '
                f'all params: {base_total:,} || trainable%: ')
    assert expected in log
    assert 'backbone' in log and 'frozen except W_O rows' in log

    ckpt = torch.load(osp.join(str(tmp_path), 'iter_2.pth'))
    meta = ckpt['meta']['apla_mm']
    assert meta['method'] == 'apla' and meta['config']['rank'] == 16
    indices = {name: info['index'] for name, info in meta['layers'].items()}
    assert indices == adapter.indices()
    with open(osp.join(str(tmp_path), 'apla_indices.json')) as f:
        assert json.load(f) == indices
    # the checkpoint is a plain model: same keys as the base config's model
    from mmengine.registry import MODELS, DefaultScope
    from apla_mm.testing import repo_config
    from mmengine.config import Config
    base_cfg = Config.fromfile(repo_config(BASES['mmseg']))
    with DefaultScope.overwrite_default_scope('mmseg'):
        base = MODELS.build(base_cfg.model)
    assert sorted(ckpt['state_dict']) == sorted(base.state_dict())
    missing = base.load_state_dict(ckpt['state_dict'], strict=True)
    assert not missing.missing_keys


def test_resume_restores_and_checks_selection(toy_seg_root, tmp_path):
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=2,
        batch_size=2)
    first = build_runner(cfg)
    first.train()
    indices = _apla_hook(first).adapter.indices()
    trained = {
        k: v.clone()
        for k, v in unwrap_model(first.model).state_dict().items()
    }

    resumed_cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=3,
        batch_size=2, resume=True)
    snapshot = ParamSnapshotHook()
    resumed = build_runner(resumed_cfg, snapshot)
    resumed.train()
    assert resumed.iter == 3
    assert _apla_hook(resumed).adapter.indices() == indices
    for key, value in trained.items():
        assert torch.equal(snapshot.before[key], value), key
    assert resumed.optim_wrapper.optimizer.state  # AdamW moments restored

    for change, match in ((dict(rank=8), 'rank: checkpoint 16, config 8'),
                          (dict(seed=1), 'seed: checkpoint 0, config 1')):
        bad = short_run_cfg(
            CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=4,
            batch_size=2, resume=True)
        bad.custom_hooks[0].update(change)
        with pytest.raises(ValueError, match=match):
            build_runner(bad).train()


def test_resume_from_non_apla_checkpoint_is_an_error(toy_seg_root, tmp_path):
    base = short_run_cfg(
        BASES['timm'], str(tmp_path), toy_seg_root, max_iters=1, batch_size=2)
    build_runner(base).train()
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=2,
        batch_size=2, resume=True)
    with pytest.raises(ValueError, match='use `load_from=<checkpoint>`'):
        build_runner(cfg).train()
    # but starting APLA from its weights works
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path / 'from'), toy_seg_root, max_iters=1,
        batch_size=2, load_from=osp.join(str(tmp_path), 'iter_1.pth'))
    build_runner(cfg).train()


def test_any_wrapper_and_deprecated_names(toy_seg_root, tmp_path):
    # the plain OptimWrapper trains APLA: rows move, W_O holds them
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=2,
        batch_size=2)
    cfg.optim_wrapper.type = 'OptimWrapper'
    runner = build_runner(cfg)
    runner.train()
    assert type(runner.optim_wrapper).__name__ == 'OptimWrapper'
    for layer in _apla_hook(runner).adapter.layers:
        m = layer.module
        assert torch.equal(m._parameters['weight'][layer.index],
                           m._parameters['apla_weight'])

    # the old APLA wrapper name without APLAHook: a plain wrapper + warning
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path / 'b'), toy_seg_root, max_iters=1,
        batch_size=2)
    cfg.custom_hooks = []
    cfg.optim_wrapper.type = 'APLAOptimWrapper'
    build_runner(cfg).train()
    logs = glob.glob(osp.join(str(tmp_path / 'b'), '*', '*.log'))
    assert logs and 'is no longer needed' in open(logs[0]).read()


def test_wrapper_with_several_optimizers_is_refused(toy_seg_root, tmp_path):
    from mmengine.optim import OptimWrapperDict
    cfg = short_run_cfg(
        CONFIGS['timm'], str(tmp_path), toy_seg_root, max_iters=1,
        batch_size=2)
    runner = build_runner(cfg)
    hook = _apla_hook(runner)
    with pytest.raises(TypeError, match='one optimizer'):
        hook.check_optim_wrapper(OptimWrapperDict())


def test_norm_selection_and_full_rank_run(toy_seg_root, tmp_path):
    cfg = short_run_cfg(
        CONFIGS['mmseg'], str(tmp_path), toy_seg_root, max_iters=1,
        batch_size=2)
    cfg.custom_hooks[0].update(selection='norm')
    runner = build_runner(cfg)
    runner.train()
    adapter = _apla_hook(runner).adapter
    for layer in adapter.layers:
        assert len(layer.index) == 16
    cfg = short_run_cfg(
        'apla/apla-full_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py',
        str(tmp_path / 'full'), toy_seg_root, max_iters=1, batch_size=2)
    snapshot = ParamSnapshotHook()
    build_runner(cfg, snapshot).train()
    moved = {
        k
        for k, v in snapshot.changed().items()
        if v and k.startswith('backbone')
    }
    assert moved == {
        f'backbone.vit.blocks.{i}.attn.proj.{p}'
        for i in range(4) for p in ('weight', 'bias')
    }
