"""The arithmetic of one training step per method: the floor of its time.

Step time on a given machine is noisy (a busy 2-core VM varies by 1.4x
between runs); the arithmetic a step does is not. :func:`count_step_flops`
counts the floating-point operations of the forward pass with the losses and
of the backward pass, recomputation by activation checkpointing included,
with :class:`torch.utils.flop_counter.FlopCounterMode` (the matrix
products, convolutions and attention kernels, which hold nearly all of a
ViT's and a UperNet head's arithmetic; element-wise operations, norms and
the optimizer step are not counted). It works on the abstract (fake-tensor)
models too, so ViT-L/g figures take seconds.

What the counts say: a method that trains less than the whole model saves
the weight gradients of its frozen layers, but the input gradient must still
flow through every block below the last adapted layer, and the heads train
in full for every method. So the frozen backbone is the floor of any method
that trains the heads, and APLA's count is the frozen floor plus the
backward pass through the blocks.
"""
from typing import Dict

from torch.utils.flop_counter import FlopCounterMode


def _by_part(counter: FlopCounterMode) -> Dict[str, int]:
    """Operations per top-level part (``backbone``, ``decode_head``, ...).

    FlopCounterMode keys modules by their path from the root class
    (``EncoderDecoder.backbone.vit...``) and counts each module's operations
    in every module around it that was *called*; mmseg's heads run their
    ``forward`` from ``loss()``, so a head itself may be missing while its
    layers are there. Each part is the sum of its outermost entries.
    """
    counts = {name: sum(ops.values())
              for name, ops in counter.get_flop_counts().items()}
    parts: Dict[str, int] = {}
    for name, count in counts.items():
        pieces = name.split('.')
        if len(pieces) < 2 or any('.'.join(pieces[:end]) in counts
                                  for end in range(2, len(pieces))):
            continue
        parts[pieces[1]] = parts.get(pieces[1], 0) + count
    return parts


def count_step_flops(trainee) -> dict:
    """Floating-point operations of one training step of a
    :class:`~apla_mm.benchmark.trainee.Trainee` (no optimizer step; the
    gradients are discarded).

    Returns:
        dict: ``forward`` (with the losses), ``backward`` (with any
        recomputation), ``total``, and ``forward_by_part``: the forward
        operations of each top-level module (``backbone``, ``decode_head``,
        ...; the backward pass is not attributed to modules; empty where
        torch cannot attribute, see :data:`apla_mm.compat.FLOPS_PER_MODULE`).
    """
    trainee.zero_grad()
    with trainee.compute():
        with FlopCounterMode(display=False) as forward:
            loss = trainee.forward_loss()
        with FlopCounterMode(display=False) as backward:
            trainee.backward(loss)
        del loss
    trainee.zero_grad()
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    return dict(forward=fwd, backward=bwd, total=fwd + bwd,
                forward_by_part=_by_part(forward))
