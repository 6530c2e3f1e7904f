"""The build-time entry point (``model = dict(type='PEFTModel', ...)`` plus
``PEFTHook``) trains exactly as the two-line hook does."""
import pytest
import torch

from apla_mm.testing import ParamSnapshotHook, build_runner, short_run_cfg

pytest.importorskip('mmseg')

CONFIGS = {
    'apla': ('apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_'
             'toyseg-64x64.py', dict(rank=16, seed=0)),
    'lora': ('lora/lora-r8_upernet_timm-vit-tiny_mln_1xb8-600it_'
             'toyseg-64x64.py', dict(rank=8, alpha=16,
                                     targets=('qkv', 'proj'))),
}


def _as_peft_model(cfg, method, settings):
    """The same run written with PEFTModel: the hook's settings move into
    the model config, the hook becomes the generic PEFTHook."""
    cfg.model = dict(type='PEFTModel', model=cfg.model, method=method,
                     **settings)
    cfg.custom_hooks = [
        dict(type='PEFTHook') if h['type'] in ('APLAHook', 'LoRAHook') else h
        for h in cfg.custom_hooks
    ]
    return cfg


@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_build_time_adapter_trains_bit_identically_to_the_hook(
        method, toy_seg_root, tmp_path):
    config, settings = CONFIGS[method]
    results = {}
    for route in ('hook', 'model'):
        cfg = short_run_cfg(config, str(tmp_path / route), toy_seg_root,
                            max_iters=3, batch_size=2, randomness=dict(
                                seed=0))
        if route == 'model':
            cfg = _as_peft_model(cfg, method, settings)
        snapshot = ParamSnapshotHook()
        runner = build_runner(cfg, snapshot)
        runner.train()
        ckpt = torch.load(tmp_path / route / 'iter_3.pth', map_location='cpu',
                          weights_only=False)
        results[route] = (snapshot, ckpt)
    (hook_snap, hook_ckpt), (model_snap, model_ckpt) = \
        results['hook'], results['model']
    assert hook_snap.before.keys() == model_snap.before.keys()
    moved = 0
    for key, value in hook_snap.after.items():
        assert torch.equal(value, model_snap.after[key]), key
        moved += not torch.equal(value, hook_snap.before[key])
    assert moved > 0
    # the checkpoints are the same plain model with the same meta
    assert hook_ckpt['state_dict'].keys() == model_ckpt['state_dict'].keys()
    assert hook_ckpt['meta']['apla_mm'] == model_ckpt['meta']['apla_mm']


def test_peft_hook_needs_an_adapted_model_or_a_method(toy_seg_root,
                                                     tmp_path):
    cfg = short_run_cfg(CONFIGS['apla'][0], str(tmp_path), toy_seg_root,
                        max_iters=1, batch_size=2)
    cfg.custom_hooks = [dict(type='PEFTHook')]
    with pytest.raises(ValueError, match="PEFTModel.*has none"):
        build_runner(cfg).train()
    # settings in two places are refused, naming both
    cfg = short_run_cfg(CONFIGS['apla'][0], str(tmp_path), toy_seg_root,
                        max_iters=1, batch_size=2)
    cfg.model = dict(type='PEFTModel', model=cfg.model, method='apla',
                     rank=8)
    with pytest.raises(ValueError, match='Give the settings in one place'):
        build_runner(cfg).train()


def test_build_time_adapter_resumes(toy_seg_root, tmp_path):
    """--resume of a PEFTModel run: the generic PEFTHook names the method, so
    the checkpoint checks accept it and the selection is taken over."""
    config, settings = CONFIGS['apla']
    work = str(tmp_path / 'run')
    cfg = _as_peft_model(
        short_run_cfg(config, work, toy_seg_root, max_iters=2, batch_size=2,
                      checkpoint_interval=1), 'apla', settings)
    build_runner(cfg).train()
    resumed = _as_peft_model(
        short_run_cfg(config, work, toy_seg_root, max_iters=3, batch_size=2,
                      checkpoint_interval=1), 'apla', settings)
    resumed.resume = True
    resumed.load_from = f'{work}/iter_2.pth'
    # what tools/train.py adds: the check that a resumed checkpoint fits
    resumed.custom_hooks = resumed.custom_hooks + [
        dict(type='CheckpointCheckHook')]
    runner = build_runner(resumed)
    runner.train()
    assert runner.iter == 3
    meta = torch.load(f'{work}/iter_3.pth', map_location='cpu',
                      weights_only=False)['meta']['apla_mm']
    assert meta['method'] == 'apla' and meta['config']['rank'] == 16
