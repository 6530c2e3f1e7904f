"""APLAAdapter on tiny timm and mmseg ViTs, without a Runner."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from apla_mm.peft import (APLAAdapter, APLAConfig, TargetNotFoundError,
                          count_parameters, random_channels)
from apla_mm.peft.apla import layer_seed
from apla_mm.peft.swap import base_class

EXPECTED_TARGETS = {
    'TimmViT': 'backbone.vit.blocks.{}.attn.proj',
    'VisionTransformer': 'backbone.layers.{}.attn.attn.out_proj',
}


def _batch(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _loss(model, x):
    return model(x).pow(2).mean()


def _frozen_reference(model, adapter):
    """A copy of the unmodified model frozen like APLA (backbone frozen,
    W_O fully trainable).

    Kernels may pick another summation order when ``requires_grad`` flags
    differ, so exact comparisons need the same flags on both sides.
    """
    reference = copy.deepcopy(model)
    reference.backbone.requires_grad_(False)
    for layer in adapter.layers:
        reference.get_submodule(layer.name).requires_grad_(True)
    return reference


def test_linear_projections_compute_only_the_rows_weight_gradient(
        tiny_model_factory):
    """A plain ``nn.Linear`` W_O (timm) gets the row-only backward: autograd
    does ``(out - r) x in`` fewer multiply-adds per token and layer than for
    a fully trainable W_O, with the same gradients. mmseg's
    ``nn.MultiheadAttention`` never calls ``out_proj.forward``: it keeps the
    routed full gradient."""
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model_factory(depth=2, dim=32)
    original = copy.deepcopy(model)
    rank = 4
    adapter = APLAAdapter(model, APLAConfig(rank=rank, seed=1))
    reference = _frozen_reference(original, adapter)
    x = _batch()
    tokens = {}

    def count_tokens(module, args, name):
        tokens[name] = args[0].numel() // args[0].shape[-1]

    for layer in adapter.layers:
        layer.module.register_forward_pre_hook(
            lambda m, args, name=layer.name: count_tokens(m, args, name))

    def backward_flops(m):
        loss = _loss(m, x)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        return counter.get_total_flops()

    saved = backward_flops(reference) - backward_flops(model)
    if type(model.backbone).__name__ == 'TimmViT':
        assert sorted(tokens) == [layer.name for layer in adapter.layers]
        assert saved == sum(2 * tokens[layer.name] * layer.in_features *
                            (layer.out_features - rank)
                            for layer in adapter.layers) > 0
    else:
        assert tokens == {} and saved == 0
    for layer in adapter.layers:
        ref = reference.get_submodule(layer.name)
        torch.testing.assert_close(
            layer.module._parameters['apla_weight'].grad,
            ref.weight.grad[layer.index], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(
            layer.module._parameters['apla_bias'].grad,
            ref.bias.grad[layer.index], rtol=1e-6, atol=1e-7)


def test_row_gradients_under_bf16_autocast(tiny_model_factory):
    """The rows train under CPU autocast (``--amp``) as a full W_O would:
    float32 gradients, equal to the selected rows of the reference's."""
    model = tiny_model_factory()
    original = copy.deepcopy(model)
    adapter = APLAAdapter(model, APLAConfig(rank=5, seed=2))
    reference = _frozen_reference(original, adapter)
    x = _batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, ref_loss = _loss(model, x), _loss(reference, x)
    loss.backward()
    ref_loss.backward()
    for layer in adapter.layers:
        ref = reference.get_submodule(layer.name)
        rows = layer.module._parameters['apla_weight']
        assert rows.grad.dtype == torch.float32
        assert rows.grad.abs().sum() > 0
        torch.testing.assert_close(rows.grad, ref.weight.grad[layer.index],
                                   rtol=2e-2, atol=1e-4)


def test_auto_detects_attention_output_projections(tiny_model_factory):
    model = tiny_model_factory(depth=3)
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    pattern = EXPECTED_TARGETS[type(model.backbone).__name__]
    assert [layer.name for layer in adapter.layers] == [
        pattern.format(i) for i in range(3)
    ]
    assert all(layer.rank == 4 and layer.out_features == 32
               for layer in adapter.layers)


def test_only_rows_and_heads_are_trainable(tiny_model_factory):
    model = tiny_model_factory()
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    rows = {n for n in trainable if n.startswith('backbone')}
    assert rows == {
        f'{layer.name}.{p}'
        for layer in adapter.layers for p in ('apla_weight', 'apla_bias')
    }
    assert {'head.weight', 'head.bias'} <= trainable
    # sum over layers of r * (in + 1)
    assert adapter.num_trainable() == 2 * 4 * (32 + 1)


def test_forward_unchanged_and_state_dict_keys_plain(tiny_model_factory):
    model = tiny_model_factory()
    original = copy.deepcopy(model)
    x = _batch()
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    reference = _frozen_reference(original, adapter)
    assert torch.equal(model(x), reference(x))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    torch.testing.assert_close(model(x), original(x))
    assert list(model.state_dict()) == list(original.state_dict())


def test_row_gradients_equal_full_weight_gradients(tiny_model_factory):
    """The rows' gradient is the selected rows of W_O's gradient: exactly
    where autograd routes the full gradient (mmseg), up to float summation
    order where the row-only backward multiplies fewer rows (timm)."""
    model = tiny_model_factory()
    original = copy.deepcopy(model)
    adapter = APLAAdapter(model, APLAConfig(rank=5, seed=3))
    reference = _frozen_reference(original, adapter)
    x = _batch()
    _loss(model, x).backward()
    _loss(reference, x).backward()
    for layer in adapter.layers:
        ref = reference.get_submodule(layer.name)
        index = layer.index
        rows = layer.module._parameters['apla_weight']
        bias = layer.module._parameters['apla_bias']
        if type(model.backbone).__name__ == 'TimmViT':
            torch.testing.assert_close(rows.grad, ref.weight.grad[index],
                                       rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(bias.grad, ref.bias.grad[index],
                                       rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(rows.grad, ref.weight.grad[index])
            assert torch.equal(bias.grad, ref.bias.grad[index])
        assert rows.grad.abs().sum() > 0
    frozen_grads = [
        n for n, p in model.named_parameters()
        if n.startswith('backbone') and not n.endswith(('apla_weight',
                                                        'apla_bias'))
        and p.grad is not None
    ]
    assert frozen_grads == []


@pytest.mark.parametrize('optimizer', ['adamw', 'sgd'])
def test_frozen_entries_bit_identical_after_training(tiny_model_factory,
                                                     optimizer):
    model = tiny_model_factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(params, lr=1e-2, weight_decay=0.5)
           if optimizer == 'adamw' else torch.optim.SGD(
               params, lr=0.1, momentum=0.9, weight_decay=0.1))
    for step in range(3):
        opt.zero_grad()
        _loss(model, _batch(step)).backward()
        opt.step()
        adapter.sync_()
    after = model.state_dict()
    targets = {layer.name: layer.index for layer in adapter.layers}
    for key, value in before.items():
        if not key.startswith('backbone'):
            continue
        layer = key.rsplit('.', 1)[0]
        if layer in targets:
            mask = torch.zeros(value.shape[0], dtype=torch.bool)
            mask[targets[layer]] = True
            assert torch.equal(after[key][~mask], value[~mask]), key
            assert not torch.equal(after[key][mask], value[mask]), key
        else:
            assert torch.equal(after[key], value), key


def test_selection_deterministic_from_seed_and_name():
    a = random_channels(64, 8, seed=0, name='backbone.blocks.0.attn.proj')
    torch.manual_seed(1234)  # the global RNG plays no part
    b = random_channels(64, 8, seed=0, name='backbone.blocks.0.attn.proj')
    c = random_channels(64, 8, seed=1, name='backbone.blocks.0.attn.proj')
    d = random_channels(64, 8, seed=0, name='backbone.blocks.1.attn.proj')
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 8
    assert layer_seed(0, 'x') == layer_seed(0, 'x') != layer_seed(0, 'y')


def test_two_models_select_the_same_channels(tiny_model_factory):
    first = APLAAdapter(tiny_model_factory(seed=0), APLAConfig(rank=6))
    second = APLAAdapter(tiny_model_factory(seed=5), APLAConfig(rank=6))
    assert first.indices() == second.indices()
    per_layer = list(first.indices().values())
    assert per_layer[0] != per_layer[1]  # chosen per layer


def test_norm_selection_picks_largest_rows(tiny_model_factory):
    model = tiny_model_factory()
    adapter = APLAAdapter(model, APLAConfig(rank=3, selection='norm'))
    assert adapter.needs_selection
    adapter.select_from_weights_()
    for layer in adapter.layers:
        w = layer.module._parameters['weight']
        b = layer.module._parameters['bias']
        score = w.pow(2).sum(1) + b.pow(2)
        expected = score.topk(3).indices.sort().values
        assert layer.index.tolist() == expected.tolist()
        assert torch.equal(layer.module._parameters['apla_weight'],
                           w[layer.index])


@pytest.mark.parametrize('rank,error', [(0, ValueError), (-2, ValueError),
                                        (1.5, TypeError), (True, TypeError),
                                        ('half', ValueError),
                                        ('8', ValueError)])
def test_bad_rank(rank, error):
    with pytest.raises(error, match='rank'):
        APLAConfig(rank=rank)


def test_rank_larger_than_layer(tiny_model_factory):
    with pytest.raises(ValueError, match='exceeds the 32 output channels'):
        APLAAdapter(tiny_model_factory(), APLAConfig(rank=33))


def test_resnet_backbone_is_a_clear_error():
    from mmseg.models.backbones import ResNet

    class Model(nn.Module):

        def __init__(self):
            super().__init__()
            self.backbone = ResNet(depth=18)

    with pytest.raises(TargetNotFoundError) as info:
        APLAAdapter(Model(), APLAConfig(rank=4))
    message = str(info.value)
    assert 'ResNet' in message and 'attn' in message and 'targets=' in message


def test_target_regex(tiny_model_factory):
    model = tiny_model_factory(depth=3)
    name = EXPECTED_TARGETS[type(model.backbone).__name__].format(1)
    adapter = APLAAdapter(model, APLAConfig(rank=4, targets=[name]))
    assert [layer.name for layer in adapter.layers] == [name]
    with pytest.raises(TargetNotFoundError, match='nothing_like_this'):
        APLAAdapter(tiny_model_factory(),
                    APLAConfig(rank=4, targets='nothing_like_this'))
    with pytest.raises(TypeError, match='no 2-D parameter'):
        APLAAdapter(tiny_model_factory(),
                    APLAConfig(rank=4, targets=r'backbone(\.vit)?'))


def test_full_rank_trains_all_of_wo(tiny_model_factory):
    model = tiny_model_factory()
    adapter = APLAAdapter(model, APLAConfig(rank='full'))
    trainable = {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith('backbone')
    }
    assert trainable == {
        f'{layer.name}.{p}'
        for layer in adapter.layers for p in ('weight', 'bias')
    }
    assert adapter.num_trainable() == 2 * 32 * 33
    assert all(type(layer.module) is base_class(layer.module)
               for layer in adapter.layers)


def test_index_file_roundtrip_and_errors(tiny_model_factory, tmp_path):
    adapter = APLAAdapter(tiny_model_factory(), APLAConfig(rank=4, seed=7))
    path = tmp_path / 'indices.json'
    adapter.save_index_file(str(path))
    loaded = APLAAdapter(tiny_model_factory(),
                         APLAConfig(rank=4, seed=0, index_file=str(path)))
    assert loaded.indices() == adapter.indices()

    names = list(adapter.indices())
    # the APLA repository's own format: block_0, block_1, ...
    blocks = tmp_path / 'blocks.json'
    blocks.write_text(
        json.dumps({f'block_{i}': [0, 1, 2, 3]
                    for i in range(len(names))}))
    by_block = APLAAdapter(tiny_model_factory(),
                           APLAConfig(rank=4, index_file=str(blocks)))
    assert all(v == [0, 1, 2, 3] for v in by_block.indices().values())

    def expect(content, match, rank=4):
        bad = tmp_path / 'bad.json'
        bad.write_text(content if isinstance(content, str) else json.dumps(
            content))
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            APLAAdapter(tiny_model_factory(),
                        APLAConfig(rank=rank, index_file=str(bad)))

    good = adapter.indices()
    expect({names[0]: good[names[0]]}, 'missing')
    expect(dict(good, extra=[1, 2, 3, 4]), 'unknown')
    expect({n: [0, 1, 2] for n in names}, 'has 3 channels, but rank is 4')
    expect({n: [0, 0, 1, 2] for n in names}, 'repeats')
    expect({n: [0, 1, 2, 99] for n in names}, 'outside')
    expect({n: [0, 1, 2, 'a'] for n in names}, 'non-integer')
    expect('{not json', 'not valid JSON')
    expect([1, 2], 'JSON object')
    with pytest.raises(FileNotFoundError, match='does not exist'):
        APLAAdapter(tiny_model_factory(),
                    APLAConfig(rank=4, index_file=str(tmp_path / 'nope')))


def test_plain_checkpoint_loads_into_rows(tiny_model_factory):
    model = tiny_model_factory(seed=0)
    other = tiny_model_factory(seed=9)
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    model.load_state_dict(other.state_dict())  # strict: keys are plain
    for layer in adapter.layers:
        src = other.get_submodule(layer.name)
        assert torch.equal(layer.module._parameters['apla_weight'],
                           src.weight[layer.index])
        assert torch.equal(layer.module._parameters['weight'], src.weight)
    torch.testing.assert_close(model(_batch()), other(_batch()))


def test_unload_gives_the_plain_trained_model(tiny_model_factory):
    model = tiny_model_factory()
    plain_types = {n: type(m) for n, m in model.named_modules()}
    keys = list(model.state_dict())
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=1e-2)
    _loss(model, _batch()).backward()
    opt.step()
    adapter.sync_()
    x = _batch(5)
    with torch.no_grad():
        trained = model(x)
    plain = adapter.unload()
    assert {n: type(m) for n, m in plain.named_modules()} == plain_types
    assert list(plain.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(plain(x), trained)


def test_autocast_bfloat16_reaches_rows(tiny_model_factory):
    model = tiny_model_factory()
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = _loss(model, _batch())
    loss.backward()
    for layer in adapter.layers:
        grad = layer.module._parameters['apla_weight'].grad
        assert grad is not None and grad.dtype == torch.float32
        assert grad.abs().sum() > 0


def test_parameter_report_counts(tiny_model_factory):
    model = tiny_model_factory()
    total_before = sum(p.numel() for p in model.parameters())
    adapter = APLAAdapter(model, APLAConfig(rank=4))
    parts = count_parameters(model, shadow=adapter.shadow_parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert parts['all']['total'] == total_before
    assert parts['all']['trainable'] == adapter.num_trainable() + head
    assert parts['backbone']['trainable'] == adapter.num_trainable()


def test_frozen_module_must_exist(tiny_model_factory):
    with pytest.raises(ValueError, match="'encoder' does not exist"):
        APLAAdapter(tiny_model_factory(),
                    APLAConfig(rank=4, frozen_modules=('encoder', )))


def test_activation_checkpointing_gives_the_same_gradients(
        tiny_model_factory):
    plain = tiny_model_factory()
    checkpointed = copy.deepcopy(plain)
    from apla_mm.memory import MemoryConfig, apply_memory_options
    a = APLAAdapter(plain, APLAConfig(rank=4))
    b = APLAAdapter(checkpointed, APLAConfig(rank=4))
    handle = apply_memory_options(checkpointed,
                                  MemoryConfig(checkpoint_blocks=True))
    blocks = handle.blocks
    assert len(blocks) == 2
    assert all(n.split('.')[-2] in ('blocks', 'layers') for n in blocks)
    saved = []

    def count(model):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = _loss(model, _batch())
        return loss, sum(saved)

    loss_a, saved_a = count(plain)
    loss_b, saved_b = count(checkpointed)
    assert saved_b < saved_a
    loss_a.backward()
    loss_b.backward()
    for la, lb in zip(a.layers, b.layers):
        torch.testing.assert_close(
            lb.module._parameters['apla_weight'].grad,
            la.module._parameters['apla_weight'].grad, rtol=1e-5, atol=1e-7)
    types = {type(checkpointed.get_submodule(n)).__name__ for n in blocks}
    assert all(t.startswith('Checkpointed') for t in types)
    b.unload()
    handle.remove()
    assert not any(
        type(m).__name__.startswith(('Checkpointed', 'APLA'))
        for m in checkpointed.modules())
