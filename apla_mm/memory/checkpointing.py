"""Activation checkpointing: transformer blocks, and the neck and the heads
in small regions. The one home of checkpointing in apla_mm, applied the same
way whatever trains (APLA, LoRA, full fine-tuning, a frozen backbone).

**Blocks** (``checkpoint_blocks``): every transformer block of the backbone
(the block around each attention output projection, found with the shared
target grammar, :func:`apla_mm.peft.targets.enclosing_block`) is recomputed
in backward with non-reentrant :func:`torch.utils.checkpoint.checkpoint`.
Why apla_mm has its own rather than using each backbone's ``with_cp``:

* it works on every backbone apla_mm supports, including those without a
  switch of their own or without one per block;
* it is non-reentrant. Reentrant checkpointing (mmcv's and mmseg's/mmdet's
  ``cp.checkpoint(_inner_forward, x)`` in ViT and Swin blocks) gives the
  parameters inside a block gradients only if the block's *input* requires
  grad. In a frozen backbone the input of the first blocks does not, so
  those backbones skip checkpointing there (``if self.with_cp and
  x.requires_grad``) and keep that block's activations; a reentrant
  checkpoint that did not skip would silently drop the gradient of APLA's
  rows or LoRA's factors inside it. Non-reentrant checkpointing has neither
  problem: every block is recomputed and every trainable tensor gets its
  gradient.

Both switches at once would recompute a block twice (the outer recompute
runs the inner checkpoint again), so :func:`enable_block_checkpointing`
refuses a block that its backbone already checkpoints (``with_cp`` on the
block, as in mmseg/mmdet, or timm's ``grad_checkpointing`` on the model
around it) and says which switch to turn off.

**Neck and heads** (``checkpoint_heads``), in small regions:

At 512² the UperNet decode head and the neck keep more for backward than
an adapted ViT backbone: every ``ConvModule`` saves its input, its conv
output (for the norm) and its activation output, at up to 128² x 2048
channels. Checkpointing a whole head would recompute all of it at once in
backward and bring the memory back; here each region is small and keeps
only its input:

* every mmcv ``ConvModule`` of the neck and the heads (conv + norm +
  activation) is one region;
* mmseg's ``MultiLevelNeck``: lateral conv, resize and output conv of one
  level are one region, so the upsampled map (x4 per side at the first
  level) is never kept;
* mmseg's ``UPerHead``: the fusion (resize of the FPN levels to the finest
  one, concatenation, ``fpn_bottleneck``, dropout and ``conv_seg``) never
  builds the concatenation (4 x channels at 1/4 of the input). A
  convolution is linear in its input channels, so ``fpn_bottleneck``'s
  conv over the concatenation equals the sum, over the levels, of the conv
  of that level's resized map with that level's slice of the weight (the
  bias added once). Each level's resize + partial conv is one region that
  keeps the level's FPN output at its own resolution; the partial sums are
  accumulated in float32 (one rounding to the autocast dtype, as the single
  conv); the norm, activation, dropout and ``conv_seg`` are one region that
  keeps the sum (channels wide). Recomputing any of these regions rebuilds
  at most a few channels-wide maps, never the 4 x channels one. A
  ``fpn_bottleneck`` this split does not cover (grouped or explicitly
  padded conv, another layer order, an eval-mode norm with mmcv's
  efficient conv-bn forward) keeps the whole fusion as one region.

Regions use the non-reentrant :func:`torch.utils.checkpoint.checkpoint`
(trainable tensors inside frozen parts still get gradients; the RNG state
is restored for the recomputation, so dropout draws the same masks).
Batch-norm layers update their running statistics once per step as without
checkpointing: the recomputation restores them afterwards. Forward outputs,
losses and gradients are those of the unmodified modules
(``tests/test_memory_structural.py``, ``test_checkpoint_heads_*``).

Upstream: ``mmseg/models/necks/multilevel_neck.py``,
``mmseg/models/decode_heads/uper_head.py`` (whose forward the two region
forwards follow step by step), ``mmcv/cnn/bricks/conv_module.py``.
"""
from typing import Callable, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from apla_mm.peft.swap import (base_class, below, has_swap, register_swap,
                               restore_class, swap_class)
from apla_mm.peft.targets import (enclosing_block, find_modules,
                                  resolve_targets)

__all__ = [
    'enable_head_checkpointing', 'disable_head_checkpointing',
    'enable_block_checkpointing', 'disable_block_checkpointing',
    'HEAD_MODULES'
]

#: Top-level parts of a segmentor/detector that are "neck and heads".
HEAD_MODULES = ('neck', 'decode_head', 'auxiliary_head', 'rpn_head',
                'roi_head', 'bbox_head', 'mask_head')


def _region(fn: Callable, modules: Sequence[nn.Module]) -> Callable:
    """``fn`` for one checkpointed call: its recomputation leaves the
    running statistics of the batch norms in ``modules`` as the first run
    set them."""
    norms = [m for mod in modules for m in mod.modules()
             if isinstance(m, _BatchNorm) and m.track_running_stats
             and m.training]
    calls = [0]

    def run(*args):
        calls[0] += 1
        if calls[0] == 1 or not norms:
            return fn(*args)
        stats = [(m, m.running_mean.clone(), m.running_var.clone(),
                  m.num_batches_tracked.clone()) for m in norms]
        try:
            return fn(*args)
        finally:
            with torch.no_grad():
                for m, mean, var, count in stats:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return run


def _active(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def run_region(fn: Callable, modules: Sequence[nn.Module], *args):
    """Run ``fn(*args)`` as one checkpointed region (plainly outside
    training or without grad)."""
    if not _active(modules[0]):
        return fn(*args)
    return checkpoint(_region(fn, modules), *args, use_reentrant=False)


def _plain(module: nn.Module) -> Callable:
    """The module's forward without its region swap (if it has one)."""
    for kind in REGION_KINDS:
        if has_swap(module, kind):
            return below(module, kind).forward.__get__(module)
    return module.forward


# -- ConvModule ---------------------------------------------------------
def _conv_module_forward(self, x, activate: bool = True, norm: bool = True):
    plain = below(self, REGION_CONV).forward.__get__(self)
    return run_region(lambda t: plain(t, activate, norm), [self], x)


# -- MultiLevelNeck -----------------------------------------------------
def _multilevel_neck_forward(self, inputs):
    from mmseg.models.utils import resize
    assert len(inputs) == len(self.in_channels)

    def level(lateral, conv, scale):
        def fn(x):
            if lateral is not None:
                x = _plain(lateral)(x)
            return _plain(conv)(resize(x, scale_factor=scale,
                                       mode='bilinear'))
        return fn

    if len(inputs) == 1:
        x = self.lateral_convs[0](inputs[0])
        return tuple(
            run_region(level(None, self.convs[i], self.scales[i]),
                       [self.convs[i]], x) for i in range(self.num_outs))
    return tuple(
        run_region(
            level(self.lateral_convs[i], self.convs[i], self.scales[i],
                  ), [self.lateral_convs[i], self.convs[i]], inputs[i])
        for i in range(self.num_outs))


# -- UPerHead -----------------------------------------------------------
def _uper_head_forward(self, inputs):
    from mmseg.models.utils import resize
    inputs = self._transform_inputs(inputs)
    laterals = [
        lateral_conv(inputs[i])
        for i, lateral_conv in enumerate(self.lateral_convs)
    ]
    laterals.append(self.psp_forward(inputs))
    levels = len(laterals)
    for i in range(levels - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + resize(
            laterals[i],
            size=laterals[i - 1].shape[2:],
            mode='bilinear',
            align_corners=self.align_corners)
    fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
    fpn_outs.append(laterals[-1])

    def fuse(*outs):
        outs = [outs[0]] + [
            resize(o, size=outs[0].shape[2:], mode='bilinear',
                   align_corners=self.align_corners) for o in outs[1:]
        ]
        feats = _plain(self.fpn_bottleneck)(torch.cat(outs, dim=1))
        return self.cls_seg(feats)

    if not _active(self.fpn_bottleneck) \
            or not _splittable(self.fpn_bottleneck, fpn_outs):
        return run_region(fuse, [self.fpn_bottleneck, self.conv_seg],
                          *fpn_outs)
    return _split_fusion(self, fpn_outs)


def _splittable(bottleneck: nn.Module, outs: Sequence[torch.Tensor]) -> bool:
    """Whether ``bottleneck`` (a ConvModule over the concatenation of
    ``outs``) can run as a sum of per-level convolutions."""
    conv = getattr(bottleneck, 'conv', None)
    if type(conv) is not nn.Conv2d or conv.groups != 1 \
            or conv.padding_mode != 'zeros' \
            or getattr(bottleneck, 'with_explicit_padding', False):
        return False
    if tuple(bottleneck.order) != ('conv', 'norm', 'act'):
        return False
    if bottleneck.with_norm and not bottleneck.norm.training \
            and getattr(bottleneck, 'efficient_conv_bn_eval_forward',
                        None) is not None:
        return False
    return sum(o.shape[1] for o in outs) == conv.in_channels


def _split_fusion(head: nn.Module, fpn_outs: Sequence[torch.Tensor]):
    """UPerHead's fusion as a sum of per-level partial convolutions, each
    its own region, then norm + activation + ``cls_seg`` as one region.

    ``conv(cat(x_0..x_n), W) + b = sum_i conv(x_i, W[:, C_i]) + b``, with
    ``C_i`` the input channels of level ``i`` (``W[:, C_i]`` is a view of
    the parameter, so the weight gradient lands in the one parameter).
    """
    from mmseg.models.utils import resize
    bottleneck = head.fpn_bottleneck
    conv = bottleneck.conv
    size = fpn_outs[0].shape[2:]

    def partial(i, start, stop):
        def fn(x):
            if i:
                x = resize(x, size=size, mode='bilinear',
                           align_corners=head.align_corners)
            return F.conv2d(x, conv.weight[:, start:stop],
                            conv.bias if i == 0 else None, conv.stride,
                            conv.padding, conv.dilation, 1)
        return fn

    total, start = None, 0
    for i, out in enumerate(fpn_outs):
        stop = start + out.shape[1]
        part = run_region(partial(i, start, stop), [conv], out)
        # float32 accumulation: one rounding to a low autocast dtype, as
        # the single convolution's
        total = part.float() if total is None else total + part.float()
        dtype, start = part.dtype, stop
    total = total.to(dtype)

    def finish(x):
        if bottleneck.with_norm:
            x = bottleneck.norm(x)
        if bottleneck.with_activation:
            x = bottleneck.activate(x)
        return head.cls_seg(x)

    return run_region(finish, [bottleneck, head.conv_seg], total)


REGION_CONV = register_swap('memory.region.conv_module', 'Checkpointed',
                            {'forward': _conv_module_forward})
REGION_NECK = register_swap('memory.region.multilevel_neck', 'Checkpointed',
                            {'forward': _multilevel_neck_forward})
REGION_UPER = register_swap('memory.region.uper_head', 'Checkpointed',
                            {'forward': _uper_head_forward})
REGION_KINDS = (REGION_CONV, REGION_NECK, REGION_UPER)


def enable_head_checkpointing(model: nn.Module,
                              parts: Sequence[str] = HEAD_MODULES
                              ) -> List[str]:
    """Checkpoint the neck and heads of ``model`` in small regions.

    Args:
        model (nn.Module): Segmentor/detector.
        parts (Sequence[str]): Top-level children treated as neck/heads
            (those present are used).

    Returns:
        list[str]: Names of the modules given a region forward.

    Raises:
        ValueError: No region found (no ConvModule in the neck/heads).
    """
    from mmcv.cnn import ConvModule
    from mmseg.models.decode_heads import UPerHead
    from mmseg.models.necks import MultiLevelNeck
    present = [n for n, _ in model.named_children() if n in parts]
    done = []
    for part in present:
        root = model.get_submodule(part)
        for name, m in root.named_modules(prefix=part):
            if any(has_swap(m, kind) for kind in REGION_KINDS):
                continue
            base = base_class(m)
            if base is UPerHead:
                swap_class(m, REGION_UPER)
            elif base is MultiLevelNeck:
                swap_class(m, REGION_NECK)
            elif isinstance(m, ConvModule) and 'forward' not in m.__dict__:
                swap_class(m, REGION_CONV)
            else:
                continue
            done.append(name)
    if not done:
        raise ValueError(
            f'checkpoint_heads: found nothing to checkpoint in the neck/heads'
            f' {present or list(parts)} of {type(model).__name__} (regions '
            'are mmcv ConvModules, MultiLevelNeck levels and UPerHead\'s '
            'fusion); set checkpoint_heads=False for this model.')
    return done


def disable_head_checkpointing(model: nn.Module, names: Sequence[str]) -> None:
    """Undo :func:`enable_head_checkpointing`."""
    for name in names:
        m = model.get_submodule(name)
        for kind in REGION_KINDS:
            restore_class(m, kind)


# -- transformer blocks --------------------------------------------------
def _checkpointed_forward(self, *args, **kwargs):
    forward = below(self, CHECKPOINTED_BLOCK).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


CHECKPOINTED_BLOCK = register_swap('memory.checkpointed_block',
                                   'Checkpointed',
                                   {'forward': _checkpointed_forward})


def own_checkpointing(model: nn.Module, block: str) -> str:
    """Where the backbone already checkpoints ``block``: the name of the
    switch that is on (``''`` if none)."""
    module = model.get_submodule(block)
    if getattr(module, 'with_cp', False) is True:
        return f'{block}.with_cp'
    parts = block.split('.')
    for end in range(len(parts) - 1, -1, -1):
        name = '.'.join(parts[:end])
        owner = model.get_submodule(name) if name else model
        if getattr(owner, 'grad_checkpointing', False) is True:
            return f'{name or type(model).__name__}.grad_checkpointing'
    return ''


def transformer_blocks(model: nn.Module,
                       within: Sequence[str] = ('backbone', )) -> List[str]:
    """Names of the transformer blocks of ``model``: those around an
    attention output projection (the ``'proj'`` shortcut of
    :mod:`apla_mm.peft.targets`) inside the modules ``within``."""
    present = [p for p in within if hasattr(model, p)] or list(within)
    blocks: List[str] = []
    for name, _ in find_modules(model, resolve_targets('proj'), present):
        block = enclosing_block(name)
        if block not in blocks:
            blocks.append(block)
    return blocks


def enable_block_checkpointing(model: nn.Module,
                               blocks: Sequence[str] = ()) -> List[str]:
    """Recompute, in backward, the transformer blocks of ``model``.

    Args:
        model (nn.Module): Segmentor/detector (or any model).
        blocks (Sequence[str]): Names of the blocks; by default every
            transformer block of the backbone (:func:`transformer_blocks`).

    Returns:
        list[str]: Names of the checkpointed blocks.

    Raises:
        ValueError: if no block is found, or the backbone already
            checkpoints a block (see the module docstring).
    """
    blocks = list(blocks) or transformer_blocks(model)
    for block in blocks:
        switch = own_checkpointing(model, block)
        if switch:
            raise ValueError(
                f'checkpoint_blocks=True would recompute {block} twice: the '
                f'backbone checkpoints it already ({switch} is True). Turn '
                "one of the two off: set the backbone's with_cp=False "
                "(recommended: apla_mm's checkpointing also covers blocks "
                'whose input needs no gradient), or drop checkpoint_blocks.')
    done = []
    for block in blocks:
        module = model.get_submodule(block)
        if not has_swap(module, CHECKPOINTED_BLOCK):
            swap_class(module, CHECKPOINTED_BLOCK)
            done.append(block)
    return done


def disable_block_checkpointing(model: nn.Module,
                                blocks: Sequence[str]) -> None:
    """Undo :func:`enable_block_checkpointing`."""
    for name in blocks:
        restore_class(model.get_submodule(name), CHECKPOINTED_BLOCK)
