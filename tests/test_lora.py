"""The LoRA baseline: adapter, hook, test-time merging and delta files."""
import copy
import os.path as osp

import pytest
import torch

from apla_mm.engine import LoRAHook
from apla_mm.peft import LoRAAdapter, LoRAConfig, TargetNotFoundError
from apla_mm.peft.delta import export_delta, merge_delta
from apla_mm.peft.utils import unwrap_model
from apla_mm.testing import ParamSnapshotHook, build_runner, short_run_cfg

EXPECTED = {
    'TimmViT': ['backbone.vit.blocks.{}.attn.qkv',
                'backbone.vit.blocks.{}.attn.proj'],
    'VisionTransformer': ['backbone.layers.{}.attn.attn',
                          'backbone.layers.{}.attn.attn.out_proj'],
}


def _batch(seed=0):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(
        seed))


def _train(model, adapter, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        model(_batch(step)).pow(2).mean().backward()
        opt.step()


def test_targets_and_trainable_count(tiny_model_factory):
    model = tiny_model_factory(depth=2)
    adapter = LoRAAdapter(model, LoRAConfig(rank=4))
    patterns = EXPECTED[type(model.backbone).__name__]
    assert sorted(layer.name for layer in adapter.layers) == sorted(
        p.format(i) for p in patterns for i in range(2))
    # qkv: r * (32 + 96), proj: r * (32 + 32), per block
    assert adapter.num_trainable() == 2 * 4 * ((32 + 96) + (32 + 32))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all('lora_' in n for n in trainable if n.startswith('backbone'))


def test_starts_from_the_base_model_and_trains(tiny_model_factory):
    model = tiny_model_factory()
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = LoRAAdapter(model, LoRAConfig(rank=4, targets='qkv'))
    torch.testing.assert_close(model(_batch()), reference(_batch()))
    _train(model, adapter)
    state = model.state_dict()
    for key, value in before.items():
        if key.startswith('backbone'):
            assert torch.equal(state[key], value), key  # frozen, untouched
    for layer in adapter.layers:
        assert layer.module.lora_B.abs().sum() > 0
    x = _batch(9)
    with torch.no_grad():
        adapted = model(x)
    plain = adapter.merge_and_unload()
    with torch.no_grad():
        merged = plain(x)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert sorted(plain.state_dict()) == sorted(before)
    assert not any('lora' in n for n, _ in plain.named_parameters())


def test_config_errors(tiny_model_factory):
    for kwargs, match in ((dict(rank=0), 'rank'), (dict(alpha=-1), 'alpha'),
                          (dict(dropout=1.0), 'dropout')):
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kwargs)
    with pytest.raises(TargetNotFoundError):
        LoRAAdapter(tiny_model_factory(), LoRAConfig(targets='nope'))


@pytest.mark.parametrize('family', ['timm', 'vit'])
def test_hook_train_checkpoint_test_and_delta(family, toy_seg_root,
                                              tmp_path):
    config = (f'lora/lora-r8_upernet_{family}{"-vit" if family == "timm" else ""}'
              '-tiny_mln_1xb8-600it_toyseg-64x64.py')
    cfg = short_run_cfg(config, str(tmp_path), toy_seg_root, max_iters=3,
                        batch_size=2)
    snapshot = ParamSnapshotHook()
    runner = build_runner(cfg, snapshot)
    runner.train()
    hook = next(h for h in runner.hooks if isinstance(h, LoRAHook))
    model = unwrap_model(runner.model).eval()
    moved = [k for k, v in snapshot.changed().items()
             if v and k.startswith('backbone')]
    assert moved and all('lora_' in k for k in moved)
    ckpt = torch.load(osp.join(str(tmp_path), 'iter_3.pth'))
    assert ckpt['meta']['apla_mm']['method'] == 'lora'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        trained = model(x, mode='tensor')

    # testing with the LoRA config: factors load, then merge (plain model)
    test_cfg = short_run_cfg(config, str(tmp_path / 'test'), toy_seg_root,
                             load_from=osp.join(str(tmp_path), 'iter_3.pth'))
    tester = build_runner(test_cfg)
    tester.test()
    tested = unwrap_model(tester.model).eval()
    assert not any('lora' in k for k in tested.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            tested(x, mode='tensor'), trained, rtol=1e-4, atol=1e-5)

    # delta: factors + heads; merged into the base equals the trained model
    delta = export_delta(ckpt)
    assert all('lora_' in k for k in delta['state_dict']
               if k.startswith('backbone'))
    merged = merge_delta(snapshot.before, delta)
    for key, value in tested.state_dict().items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)
    assert hook.adapter is not None
