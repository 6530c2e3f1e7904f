"""Exporting the trained subset of an APLA run and merging it back."""
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope

from apla_mm.peft.delta import (DeltaMismatchError, export_delta,
                                merge_delta)
from apla_mm.peft.utils import unwrap_model
from apla_mm.testing import (REPO_ROOT, ParamSnapshotHook, build_runner,
                             repo_config, short_run_cfg)

APLA = 'apla/apla-r8_upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'
BASE = 'finetune/upernet_vit-tiny_mln_1xb8-600it_toyseg-64x64.py'


@pytest.fixture(scope='module')
def trained(toy_seg_root, tmp_path_factory):
    work = str(tmp_path_factory.mktemp('delta'))
    cfg = short_run_cfg(APLA, work, toy_seg_root, max_iters=3, batch_size=2)
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    return dict(
        work=work,
        ckpt=osp.join(work, 'iter_3.pth'),
        base_state=snapshot.before,
        model=unwrap_model(runner.model).eval())


def _plain_model():
    cfg = Config.fromfile(repo_config(BASE))
    with DefaultScope.overwrite_default_scope('mmseg'):
        return MODELS.build(cfg.model).eval()


def test_delta_holds_rows_and_heads_only(trained):
    ckpt = torch.load(trained['ckpt'])
    delta = export_delta(ckpt)
    state = delta['state_dict']
    rows = [k for k in state if k.startswith('backbone')]
    assert sorted(rows) == sorted(
        f'backbone.layers.{i}.attn.attn.out_proj.{p}' for i in range(4)
        for p in ('weight', 'bias'))
    for key in rows:
        assert state[key].shape[0] == 8
    heads = [k for k in ckpt['state_dict'] if not k.startswith('backbone')]
    assert set(heads) <= set(state)  # params and buffers (BN statistics)
    backbone_entries = sum(
        v.numel() for k, v in ckpt['state_dict'].items()
        if k.startswith('backbone'))
    assert sum(state[k].numel() for k in rows) == 4 * 8 * 65
    assert sum(state[k].numel() for k in rows) < backbone_entries / 10


def test_merged_model_equals_trained_model(trained, toy_seg_root):
    delta = export_delta(torch.load(trained['ckpt']))
    merged = merge_delta(trained['base_state'], delta)
    trained_state = trained['model'].state_dict()
    assert sorted(merged) == sorted(trained_state)
    for key, value in trained_state.items():
        assert torch.equal(merged[key], value), key
    model = _plain_model()
    model.load_state_dict(merged, strict=True)
    x = torch.randn(2, 3, 64, 64)
    # Same requires_grad flags on both sides: kernels may otherwise sum in
    # another order (differences ~1e-7).
    for m in (model, trained['model']):
        m.requires_grad_(False)
    assert torch.equal(
        model(x, mode='tensor'), trained['model'](x, mode='tensor'))


def test_merge_into_other_weights_is_refused(trained):
    delta = export_delta(torch.load(trained['ckpt']))
    other = _plain_model().state_dict()
    with pytest.raises(DeltaMismatchError, match='fingerprint'):
        merge_delta(other, delta)
    merged = merge_delta(other, delta, check_fingerprint=False)
    assert torch.equal(merged['decode_head.conv_seg.weight'],
                       delta['state_dict']['decode_head.conv_seg.weight'])
    with pytest.raises(ValueError, match='not an apla_mm delta'):
        merge_delta(other, {'state_dict': {}})
    with pytest.raises(ValueError, match='no meta'):
        export_delta({'meta': {}, 'state_dict': {}})


def test_tools_export_and_merge(trained, tmp_path):
    base = str(tmp_path / 'base.pth')
    torch.save({'state_dict': trained['base_state']}, base)
    delta, merged = str(tmp_path / 'delta.pth'), str(tmp_path / 'merged.pth')
    for args in (['export_delta', trained['ckpt'], '--out', delta],
                 ['merge_delta', delta, '--base', base, '--out', merged]):
        subprocess.run([sys.executable, f'tools/{args[0]}.py', *args[1:]],
                       cwd=REPO_ROOT, check=True, capture_output=True)
    assert osp.getsize(delta) < osp.getsize(trained['ckpt'])
    state = torch.load(merged)['state_dict']
    for key, value in trained['model'].state_dict().items():
        assert torch.equal(state[key], value), key
    # nothing the user has is overwritten
    proc = subprocess.run(
        [sys.executable, 'tools/export_delta.py', trained['ckpt'], '--out',
         delta], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and 'exists' in proc.stderr
