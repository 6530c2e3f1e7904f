"""One way to change a module: PEFT methods and memory options are class swaps
(apla_mm.peft.swap) that stack, pickle, deep-copy and unload, with every
memory option on, for APLA, LoRA and full fine-tuning; the adapter lives on
the model; W_O can never be stale."""
import warnings

import pytest
import torch

from apla_mm.testing import saved_and_copied
from conftest import config_path

pytest.importorskip('mmseg')

ALL_OPTIONS = dict(lean_loss=True, checkpoint_blocks=True,
                   checkpoint_heads=True, fused_attention=True)


def _build():
    """Tiny mmseg UperNet ViT (mmseg's ViT: nn.MultiheadAttention, so every
    memory option applies), BatchNorm instead of SyncBN."""
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(
        config_path('_base_', 'models', 'upernet_vit-tiny_mln.py'))
    for head in ('decode_head', 'auxiliary_head'):
        cfg.model[head].norm_cfg = dict(type='BN', requires_grad=True)
        cfg.model[head].num_classes = 4
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model.train()


def _batch(seed=0, size=64):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    samples = []
    for _ in range(2):
        s = SegDataSample()
        s.gt_sem_seg = PixelData(
            data=torch.randint(0, 4, (1, size, size), generator=g))
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                            pad_shape=(size, size)))
        samples.append(s)
    return x, samples


def _loss(model, seed=0):
    x, samples = _batch(seed)
    torch.manual_seed(0)  # dropout/drop-path draws
    return model.parse_losses(model(x, samples, mode='loss'))[0]


def _adapt(model, method):
    from apla_mm.peft import APLAAdapter, APLAConfig, LoRAAdapter, LoRAConfig
    torch.manual_seed(1)  # LoRA's A is drawn
    if method == 'apla':
        return APLAAdapter(model, APLAConfig(rank=4))
    if method == 'lora':
        return LoRAAdapter(model, LoRAConfig(rank=4))
    return None


def _swapped(model):
    from apla_mm.peft.swap import swap_kinds
    return {n: swap_kinds(m) for n, m in model.named_modules()
            if swap_kinds(m)}


@pytest.mark.parametrize('method', ['apla', 'lora', 'full'])
def test_every_structural_change_pickles_copies_and_unloads(method):
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    plain_types = [type(m) for m in model.modules()]
    plain_keys = list(model.state_dict())
    adapter = _adapt(model, method)
    handle = apply_memory_options(model, MemoryConfig(**ALL_OPTIONS))
    kinds = {k for ks in _swapped(model).values() for k in ks}
    assert {'memory.lean_loss', 'memory.checkpointed_block',
            'memory.region.conv_module', 'memory.region.uper_head',
            'memory.region.multilevel_neck', 'memory.sdpa_mha'} <= kinds
    if method == 'lora':  # two swaps on one nn.MultiheadAttention
        stacked = _swapped(model)['backbone.layers.0.attn.attn']
        assert stacked == ('lora.mha', 'memory.sdpa_mha')
    # no instance-level method patches anywhere
    assert not [n for n, m in model.named_modules()
                if {'forward', 'loss_by_feat'} & set(m.__dict__)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    _loss(model).backward()
    optimizer.step()  # no attach_optimizer: W_O must follow anyway
    model.eval()
    with torch.no_grad():
        expected = model(_batch(1)[0], mode='tensor')
    adapted_keys = list(model.state_dict())  # + LoRA's factors
    loaded, twin = saved_and_copied(model)
    for other in (loaded, twin):
        assert _swapped(other) == _swapped(model)
        assert list(other.state_dict()) == adapted_keys
        with torch.no_grad():
            torch.testing.assert_close(other(_batch(1)[0], mode='tensor'),
                                       expected, rtol=0, atol=0)
        other.train()
        torch.testing.assert_close(_loss(other), _loss(model.train()),
                                   rtol=0, atol=0)
        model.eval()
    # the copy trains: everything trainable receives a gradient
    twin.train()
    _loss(twin).backward()
    assert all(p.grad is not None for p in twin.parameters()
               if p.requires_grad)
    # unloading in any order leaves the plain model
    if adapter is not None:
        adapter.merge_and_unload()
        assert 'memory.checkpointed_block' in _swapped(model)[
            'backbone.layers.0']
    handle.remove()
    assert [type(m) for m in model.modules()] == plain_types
    assert list(model.state_dict()) == plain_keys


def test_frozen_low_precision_survives_pickling():
    from apla_mm.memory import MemoryConfig, apply_memory_options
    model = _build()
    _adapt(model, 'apla')
    handle = apply_memory_options(model, MemoryConfig(frozen_dtype='bfloat16'))
    handle.cast_frozen_()
    state = model.state_dict()
    for other in saved_and_copied(model):
        assert other.backbone.layers[0].ffn.layers[1].weight.dtype == \
            torch.bfloat16
        # the copy's state dict still holds the fp32 masters
        for key, value in other.state_dict().items():
            assert value.dtype == state[key].dtype, key
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize('method', ['apla', 'lora'])
def test_memory_options_and_adapters_apply_in_either_order(method):
    from apla_mm.memory import MemoryConfig, apply_memory_options
    first, second = _build(), _build()
    _adapt(first, method)
    h1 = apply_memory_options(first, MemoryConfig(**ALL_OPTIONS))
    h2 = apply_memory_options(second, MemoryConfig(**ALL_OPTIONS))
    _adapt(second, method)
    a, b = _loss(first), _loss(second)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.backward()
    b.backward()
    for (name, pa), pb in zip(first.named_parameters(), second.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0,
                                       msg=name)
    h1.remove()
    h2.remove()


def test_block_checkpointing_is_one_option_for_every_method():
    """``checkpoint_blocks`` gives the same gradients with less saved, for
    APLA, LoRA and full fine-tuning, and refuses the backbone's own switch
    on top."""
    from apla_mm.memory import MemoryConfig, apply_memory_options
    for method in ('apla', 'lora', 'full'):
        plain, cp = _build(), _build()
        _adapt(plain, method)
        _adapt(cp, method)
        handle = apply_memory_options(cp,
                                      MemoryConfig(checkpoint_blocks=True))
        assert handle.blocks == [f'backbone.layers.{i}' for i in range(4)]
        saved = {}
        for name, model in (('plain', plain), ('cp', cp)):
            sizes = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: sizes.append(t.numel()) or t, lambda t: t):
                loss = _loss(model)
            saved[name] = sum(sizes)
            loss.backward()
        assert saved['cp'] < saved['plain'], method
        for (name, pa), pb in zip(plain.named_parameters(),
                                  cp.parameters()):
            if pa.requires_grad:
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5,
                                           atol=1e-6, msg=f'{method} {name}')
    model = _build()
    model.backbone.layers[0].with_cp = True
    with pytest.raises(ValueError, match='twice.*backbone.layers.0.with_cp'):
        apply_memory_options(model, MemoryConfig(checkpoint_blocks=True))


def _fused_adamw_supported() -> bool:
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
        return True
    except RuntimeError:  # CPU fused AdamW arrived in torch 2.4
        return False


@pytest.mark.parametrize('update', ['adamw', 'fused-adamw', 'unversioned'])
def test_w_o_follows_the_rows_without_attach_optimizer(update):
    """optimizer.step() without attach_optimizer/sync_ cannot leave W_O
    stale: a plain optimizer, a fused one, or any update that does not move
    the version counters (what fused AdamW does on torch 2.13)."""
    from apla_mm.peft.apla.layer import INDEX_BUFFER
    if update == 'fused-adamw' and not _fused_adamw_supported():
        pytest.skip('no fused AdamW on CPUs in this torch')
    model = _build()
    adapter = _adapt(model, 'apla')
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=0.1, **(dict(fused=True) if update == 'fused-adamw'
                           else {}))
    _loss(model).backward()
    if update == 'unversioned':
        for layer in adapter.layers:  # .data: no version counter moves
            layer.module.apla_weight.data.add_(0.5)
    else:
        optimizer.step()
    unversioned = update != 'adamw' and not (
        update == 'fused-adamw' and _fused_step_moves_versions())
    from apla_mm.peft.apla import layer as apla_layer
    apla_layer._WARNED.clear()  # the warning is given once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        state = model.state_dict()
    for layer in adapter.layers:
        m = layer.module
        index = m._buffers[INDEX_BUFFER]
        key = layer.name + '.weight'
        assert torch.equal(state[key].index_select(0, index),
                           m.apla_weight.detach()), (update, key)
    # without moved counters the values are compared, and the user is told
    # to attach the optimizer
    assert any('attach_optimizer' in str(w.message)
               for w in caught) == unversioned


def _fused_step_moves_versions() -> bool:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    before = p._version
    torch.optim.AdamW([p], fused=True).step()
    return p._version != before


def test_peft_model_builds_the_adapted_model_itself():
    from mmengine.config import Config
    from mmseg.registry import MODELS

    from apla_mm.peft import APLAAdapter, get_adapter
    cfg = Config.fromfile(
        config_path('_base_', 'models', 'upernet_vit-tiny_mln.py'))
    for head in ('decode_head', 'auxiliary_head'):
        cfg.model[head].norm_cfg = dict(type='BN', requires_grad=True)
    model = MODELS.build(dict(type='PEFTModel', model=cfg.model,
                              method='apla', rank=4, seed=3))
    assert type(model).__name__ == 'EncoderDecoder'
    adapter = get_adapter(model)
    assert isinstance(adapter, APLAAdapter) and adapter.config.seed == 3
    keys = list(model.state_dict())
    assert not [k for k in keys if 'apla' in k]
    with pytest.raises(RuntimeError, match='already adapted'):
        APLAAdapter(model, adapter.config)
    with pytest.raises(TypeError, match='checkpoint_blocks'):
        MODELS.build(dict(type='PEFTModel', model=cfg.model, method='apla',
                          with_cp=True))
    with pytest.raises(ValueError, match="PEFTModel: unknown PEFT method "
                       "'lorra'"):
        MODELS.build(dict(type='PEFTModel', model=cfg.model,
                          method='lorra'))
    adapter.unload()
    assert get_adapter(model) is None


def test_load_guard_sees_every_loader_without_patching():
    """Per-module load hooks record torch's and mmengine's loaders alike
    (mmdet's Swin loads with nn.Module.load_state_dict); nothing of mmengine
    is replaced while recording."""
    import mmengine.runner.checkpoint as ckpt
    from mmengine.runner.checkpoint import load_state_dict as mm_load

    from apla_mm.utils.load_guard import (IncompletePretrainedLoadError,
                                          PretrainedLoadRecorder,
                                          check_frozen_pretrained)
    original = ckpt.load_state_dict
    for loader in ('torch', 'mmengine'):
        model = _build()
        full = {k: v.clone() for k, v in model.backbone.state_dict().items()}
        partial = {k: v for k, v in full.items()
                   if not k.startswith('layers.1.ffn')}
        recorder = PretrainedLoadRecorder(model, ('backbone', )).start()
        assert ckpt.load_state_dict is original
        if loader == 'torch':
            model.backbone.load_state_dict(partial, strict=False)
        else:
            mm_load(model.backbone, partial)
        loads = recorder.stop()
        with pytest.raises(IncompletePretrainedLoadError,
                           match='backbone.layers.1.ffn'):
            check_frozen_pretrained(model, loads, ('backbone', ), 'apla')
        # a later complete load (load_from) makes the entries complete
        recorder = PretrainedLoadRecorder(model, ('backbone', )).start()
        model.backbone.load_state_dict(partial, strict=False)
        model.load_state_dict({'backbone.' + k: v for k, v in full.items()},
                              strict=False)
        assert not check_frozen_pretrained(model, recorder.stop(),
                                           ('backbone', ), 'apla')
        # the hooks are gone once recording stops
        assert not any(m._load_state_dict_pre_hooks
                       for m in model.backbone.modules())
