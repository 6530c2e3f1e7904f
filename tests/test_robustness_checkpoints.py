"""Damaged, foreign and partial checkpoints, resume pointers, and frozen
backbones whose pretrained weights did not load (issue 13), in-process."""
import copy
import importlib.util
import os
import os.path as osp
import sys

import pytest
import torch

from apla_mm.peft.delta import export_delta, merge_delta
from apla_mm.peft.utils import unwrap_model
from apla_mm.testing import REPO_ROOT, build_runner, short_run_cfg
from apla_mm.utils.checkpoint_io import (CheckpointError,
                                         CheckpointMismatchError,
                                         check_state_dict_match,
                                         find_resume_checkpoint,
                                         load_checkpoint_file,
                                         verify_checkpoint_file)
from apla_mm.utils.load_guard import IncompletePretrainedLoadError

TOYBASE = ('apla/apla-r16-toybase_upernet_vit-tiny_mln_1xb8-600it_'
           'toyseg-64x64.py')
FT = 'finetune/upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
TIMM_APLA = ('apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_'
             'toyseg-64x64.py')
LORA_TOY = 'lora/lora-r8_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'


def _tool(name):
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO_ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def toy_backbone(tmp_path_factory):
    """The toy "pretrained" mmseg ViT file of tools/make_toy_data.py."""
    out = str(tmp_path_factory.mktemp('toybase'))
    return _tool('make_toy_data').make_toy_pretrained(out)


def _cfg(config, work_dir, root, backbone_file=None, **kwargs):
    kwargs.setdefault('batch_size', 2)
    kwargs.setdefault('max_iters', 1)
    cfg = short_run_cfg(config, str(work_dir), root, **kwargs)
    if backbone_file is not None:
        cfg.model.backbone.init_cfg = dict(
            type='Pretrained', checkpoint=backbone_file)
    return cfg


@pytest.fixture(scope='module')
def apla_run(toy_seg_root, toy_backbone, tmp_path_factory):
    """Two APLA iterations from the toy backbone file: its checkpoint."""
    work = tmp_path_factory.mktemp('apla_run')
    cfg = _cfg(TOYBASE, work, toy_seg_root, toy_backbone, max_iters=2)
    build_runner(cfg).train()
    return str(work / 'iter_2.pth'), cfg


# -- item 2: damaged files ---------------------------------------------------
def _small_checkpoint(path):
    torch.save({'state_dict': {'w': torch.arange(4096.0)}}, path)
    return str(path)


def test_damaged_checkpoints_are_named_errors(tmp_path):
    good = _small_checkpoint(tmp_path / 'good.pth')
    verify_checkpoint_file(good)
    data = bytearray(open(good, 'rb').read())

    flipped = tmp_path / 'flipped.pth'
    middle = len(data) // 2
    flip = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    damaged = data[:middle] + flip + data[middle + 64:]
    flipped.write_bytes(bytes(damaged))
    # torch itself reads it without complaint: the reason for the check.
    assert not torch.equal(torch.load(str(flipped))['state_dict']['w'],
                           torch.arange(4096.0))
    with pytest.raises(CheckpointError, match='CRC-32') as info:
        verify_checkpoint_file(str(flipped))
    assert 'flipped.pth' in str(info.value)

    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(bytes(data[:len(data) // 3]))
    with pytest.raises(CheckpointError, match='truncated'):
        verify_checkpoint_file(str(truncated))
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty'):
        load_checkpoint_file(str(empty))
    text = tmp_path / 'notes.pth'
    text.write_text('iter_600.pth is the good one\n')
    with pytest.raises(CheckpointError, match='text file') as info:
        load_checkpoint_file(str(text))
    assert 'weights_only=False' not in str(info.value)
    with pytest.raises(FileNotFoundError, match='absent.pth'):
        verify_checkpoint_file(str(tmp_path / 'absent.pth'))


def test_test_tool_refuses_a_damaged_checkpoint(apla_run, monkeypatch,
                                                tmp_path):
    """tools/test.py checks before anything is built (torch alone would
    evaluate the damaged file)."""
    ckpt_path, _ = apla_run
    data = bytearray(open(ckpt_path, 'rb').read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF
                                     for b in data[middle:middle + 64])
    damaged = tmp_path / 'iter_600.pth'
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(sys, 'argv', [
        'tools/test.py', osp.join(REPO_ROOT, 'configs', TOYBASE),
        str(damaged), '--work-dir', str(tmp_path / 'test')
    ])
    with pytest.raises(CheckpointError, match='CRC-32') as info:
        _tool('test').main()
    assert str(damaged) in str(info.value)
    assert not (tmp_path / 'test').exists()


def test_refused_pickle_does_not_advise_disabling_the_check(tmp_path):
    from fractions import Fraction
    path = str(tmp_path / 'odd.pth')
    torch.save({'state_dict': {}, 'extra': Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match='safely') as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert 'Fraction' in message and 'weights_only=False' not in message


# -- item 3: foreign / partial checkpoints -----------------------------------
def test_state_dict_match_counts_and_examples():
    model = {'a.w': torch.zeros(2, 2), 'a.b': torch.zeros(2),
             'c.w': torch.zeros(3)}
    with pytest.raises(CheckpointMismatchError, match='does not belong') as e:
        check_state_dict_match(model, {'roi_head.fc.weight': torch.zeros(1)},
                               'det.pth')
    assert '0 of the model\'s 3 entries' in str(e.value)
    assert 'roi_head.fc.weight' in str(e.value)
    partial = {'a.w': torch.zeros(2, 2), 'c.w': torch.zeros(4)}
    with pytest.raises(CheckpointMismatchError,
                       match='barely overlaps') as e:
        check_state_dict_match(model, partial, 'p.pth')
    assert '--allow-partial-checkpoint' in str(e.value)
    assert 'c.w: checkpoint (4,) vs model (3,)' in str(e.value)
    result = check_state_dict_match(model, partial, 'p.pth',
                                    allow_partial=True)
    assert result.matched == ['a.w'] and result.missing == ['a.b']
    assert check_state_dict_match(model, dict(model), 'same.pth').complete


def test_test_run_refuses_a_foreign_checkpoint(apla_run, toy_seg_root,
                                               tmp_path):
    from apla_mm.engine.hooks import CheckpointCheckHook
    ckpt_path, _ = apla_run
    ckpt = load_checkpoint_file(ckpt_path)
    # A "detector": a few backbone entries, the rest another model's.
    foreign = {k: v for i, (k, v) in enumerate(ckpt['state_dict'].items())
               if k.startswith('backbone.') and i % 4 == 0}
    foreign.update({'roi_head.bbox_head.fc_cls.weight': torch.zeros(5, 8),
                    'rpn_head.rpn_conv.weight': torch.zeros(8, 8, 3, 3)})
    path = str(tmp_path / 'det.pth')
    torch.save({'meta': {}, 'state_dict': foreign}, path)
    cfg = _cfg(FT, tmp_path / 'test', toy_seg_root, val=True)
    cfg.load_from = path
    with pytest.raises(CheckpointMismatchError, match='barely overlaps'):
        build_runner(cfg, CheckpointCheckHook()).test()
    # The APLA checkpoint itself fits the base config exactly.
    cfg.load_from = ckpt_path
    metrics = build_runner(cfg, CheckpointCheckHook()).test()
    assert 'mIoU' in metrics


# -- item 9: where tools/test.py writes, and label maps one can look at -------
def test_test_tool_outputs_are_reported_and_coloured(apla_run, toy_seg_root,
                                                     tmp_path):
    import argparse

    import numpy as np
    from PIL import Image
    tool = _tool('test')
    ckpt_path, _ = apla_run
    cfg = _cfg(FT, tmp_path / 'test', toy_seg_root, val=True)
    cfg.load_from = ckpt_path
    cfg.default_hooks.visualization = dict(type='SegVisualizationHook')
    # a visualizer of its own (mmengine reuses instances by name)
    cfg.visualizer.name = f'vis_{id(tmp_path)}'
    out, show = str(tmp_path / 'preds'), str(tmp_path / 'vis')
    args = argparse.Namespace(out=out, show=False, show_dir=show,
                              wait_time=0)
    tool.trigger_visualization(cfg, args, 'seg')
    cfg.test_evaluator.update(output_dir=out, keep_results=True)
    runner = build_runner(cfg)
    runner.test()
    lines = tool.report_outputs(runner, args, 'seg')
    drawn = osp.join(show, 'vis_data', 'vis_image')
    assert lines == [
        f'--out: label maps (one class value per pixel) in {out}/; '
        f'coloured copies (8) in {out}/color/',
        f'--show-dir: images with the predictions drawn in {drawn}/'
    ]
    maps = sorted(os.listdir(out))
    assert len([m for m in maps if m.endswith('.png')]) == 8
    assert len(os.listdir(drawn)) == 8
    palette = runner.test_dataloader.dataset.metainfo['palette']
    for name in (m for m in maps if m.endswith('.png')):
        labels = np.asarray(Image.open(osp.join(out, name)))
        rgb = np.asarray(Image.open(osp.join(out, 'color', name)))
        assert rgb.shape == labels.shape + (3, )
        # reduce_zero_label: class c is written as c + 1
        for value in np.unique(labels):
            assert tuple(rgb[labels == value][0]) == tuple(
                palette[value - 1])


# -- item 8: resume an APLA checkpoint with another config -------------------
def test_full_finetuning_resume_of_apla_checkpoint_names_it(
        apla_run, toy_seg_root, tmp_path):
    from apla_mm.engine.hooks import CheckpointCheckHook
    ckpt_path, _ = apla_run
    cfg = _cfg(FT, tmp_path, toy_seg_root, max_iters=3, resume=True,
               load_from=ckpt_path)
    with pytest.raises(ValueError, match='written by an APLA run') as info:
        build_runner(cfg, CheckpointCheckHook()).train()
    assert 'load_from' in str(info.value)


def test_export_delta_of_a_delta_is_a_clear_error(apla_run):
    ckpt_path, _ = apla_run
    delta = export_delta(load_checkpoint_file(ckpt_path))
    with pytest.raises(ValueError, match='already a delta'):
        export_delta(delta)


def test_delta_round_trip_into_the_toy_base(apla_run, toy_backbone):
    ckpt_path, cfg = apla_run
    ckpt = load_checkpoint_file(ckpt_path)
    config = str(osp.join(cfg.work_dir, osp.basename(TOYBASE)))
    assert osp.isfile(config)  # the dumped config points at the base file
    base = _tool('merge_delta').base_from_config(config)
    merged = merge_delta(base, export_delta(ckpt))
    assert sorted(merged) == sorted(ckpt['state_dict'])
    for key, value in ckpt['state_dict'].items():
        assert torch.equal(merged[key], value), key


# -- item 4: which checkpoint --resume takes ---------------------------------
def test_resume_takes_the_newest_intact_checkpoint(tmp_path):
    work = str(tmp_path)
    for step in (2, 4, 6):
        _small_checkpoint(tmp_path / f'iter_{step}.pth')
    assert find_resume_checkpoint(work).path.endswith('iter_6.pth')
    (tmp_path / 'iter_6.pth').write_bytes(b'')  # killed while saving
    (tmp_path / 'last_checkpoint').write_text('')  # empty pointer
    choice = find_resume_checkpoint(work)
    assert choice.path.endswith('iter_4.pth')
    assert [osp.basename(p) for p, _ in choice.skipped] == ['iter_6.pth']
    for step in (2, 4):
        (tmp_path / f'iter_{step}.pth').write_bytes(b'PK\x03\x04garbage')
    before = {p: open(osp.join(work, p), 'rb').read()
              for p in os.listdir(work)}
    with pytest.raises(CheckpointError, match='none of the 3 checkpoints'):
        find_resume_checkpoint(work)
    assert before == {p: open(osp.join(work, p), 'rb').read()
                      for p in os.listdir(work)}
    assert find_resume_checkpoint(str(tmp_path / 'new')).path is None


def test_prepare_resume_at_the_end_says_so(apla_run):
    from mmengine.config import Config

    from apla_mm.utils.cli import prepare_resume
    ckpt_path, cfg = apla_run
    cfg = Config(copy.deepcopy(cfg._cfg_dict.to_dict()))
    cfg.work_dir = osp.dirname(ckpt_path)
    message = prepare_resume(cfg, 'auto')
    assert 'already at the end of training' in message
    assert 'train_cfg.max_iters' in message
    assert cfg.load_from == ckpt_path and cfg.resume
    cfg.train_cfg.max_iters = 5
    assert prepare_resume(cfg, ckpt_path) is None


def test_amp_note_names_the_dtype():
    from mmengine.config import Config

    from apla_mm.utils.cli import amp_note
    cfg = Config(dict(optim_wrapper=dict(type='APLAAmpOptimWrapper')))
    assert 'bfloat16' in amp_note(cfg, has_gpu=False)
    assert amp_note(cfg, has_gpu=True).startswith('float16 autocast')


# -- item 1: frozen backbones that did not get their pretrained weights ------
def test_incomplete_pretrained_load_of_a_frozen_backbone_stops_the_run(
        toy_seg_root, toy_backbone, tmp_path):
    state = torch.load(toy_backbone)['state_dict']
    # A file with 2 of the 4 layers: layers 2-3 would stay random, frozen.
    short = str(tmp_path / 'two_layers.pth')
    torch.save({k: v for k, v in state.items()
                if not k.startswith(('layers.2.', 'layers.3.'))}, short)
    cfg = _cfg(TOYBASE, tmp_path / 'a', toy_seg_root, short)
    with pytest.raises(IncompletePretrainedLoadError) as info:
        build_runner(cfg).train()
    message = str(info.value)
    assert '24 missing in the file' in message
    assert 'backbone.layers.2.ln1.weight' in message
    assert 'allow_partial_pretrained' in message
    # Allowed explicitly, the run trains (and says what stayed random).
    cfg.allow_partial_pretrained = [r'backbone\.layers\.[23]\..*']
    runner = build_runner(cfg)
    runner.train()
    assert runner.iter == 1


def test_pretrained_file_of_another_width_stops_the_run(
        toy_seg_root, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, DefaultScope
    base = Config.fromfile(osp.join(REPO_ROOT, 'configs', FT))
    backbone = copy.deepcopy(base.model.backbone)
    # (wider, not narrower: APLA's row pre-hook in apla.py raises an
    # IndexError for a narrower W_O before any check can run)
    backbone.update(embed_dims=128)
    with DefaultScope.overwrite_default_scope('mmseg'):
        narrow = MODELS.build(backbone)
    path = str(tmp_path / 'narrow.pth')
    torch.save({'state_dict': narrow.state_dict()}, path)
    cfg = _cfg(TOYBASE, tmp_path / 'w', toy_seg_root, path)
    with pytest.raises(IncompletePretrainedLoadError,
                       match='of another shape'):
        build_runner(cfg).train()


def test_timm_file_with_fewer_blocks_stops_the_run(toy_seg_root, tmp_path):
    cfg = _cfg(TIMM_APLA, tmp_path / 'build', toy_seg_root)
    from mmengine.registry import MODELS, DefaultScope
    with DefaultScope.overwrite_default_scope('mmseg'):
        vit = MODELS.build(cfg.model.backbone).vit
    path = str(tmp_path / 'two_blocks.pth')
    torch.save({k: v for k, v in vit.state_dict().items()
                if not k.startswith(('blocks.2.', 'blocks.3.'))}, path)
    cfg.model.backbone.init_cfg = dict(type='Pretrained', checkpoint=path)
    with pytest.raises(IncompletePretrainedLoadError,
                       match=r'backbone\.vit\.blocks\.2\.'):
        build_runner(cfg).train()


def test_complete_pretrained_load_passes_with_lora_factors(
        toy_seg_root, toy_backbone, tmp_path):
    """LoRA's own factors are never expected in the pretrained file; the
    frozen entries LoRA does not adapt equal the file."""
    if not osp.isfile(osp.join(REPO_ROOT, 'configs', LORA_TOY)):
        pytest.skip(f'{LORA_TOY} not in this checkout')
    cfg = _cfg(LORA_TOY, tmp_path, toy_seg_root, toy_backbone)
    runner = build_runner(cfg)
    runner.train()
    state = unwrap_model(runner.model).state_dict()
    source = torch.load(toy_backbone)['state_dict']
    for key, value in source.items():
        if '.attn.' not in key:
            assert torch.equal(state['backbone.' + key], value), key
