"""Moving an already-built optimizer onto a PEFT-modified model."""
from typing import Dict, Iterable, List

import torch
import torch.nn as nn


def rebind_optimizer(optimizer: torch.optim.Optimizer,
                     replacements: Dict[int, List[nn.Parameter]],
                     model: nn.Module,
                     new_parameters: Iterable[nn.Parameter] = ()) -> int:
    """Make ``optimizer`` train exactly the model's trainable parameters.

    mmengine builds the optimizer before any hook runs, on the unmodified
    model. Afterwards a PEFT method has frozen parameters and created new
    ones. This edits the existing parameter groups in place, so the
    learning-rate schedulers built on them (and paramwise settings such as
    ``decay_mult``) keep working:

    * a parameter listed in ``replacements`` is replaced, at its position and
      in its group, by its stand-ins (e.g. W_O by its trainable rows, which
      inherit W_O's learning rate and weight decay);
    * any other parameter that no longer requires grad is dropped;
    * ``new_parameters`` that no group holds yet are appended to the first
      group (e.g. LoRA factors);
    * groups are never removed (schedulers index them), possibly left empty.

    Args:
        optimizer (torch.optim.Optimizer): Optimizer without state yet.
        replacements (dict): ``id(old parameter) -> [new parameters]``.
        model (nn.Module): The modified model; every trainable parameter of it
            must end up in a group.
        new_parameters (Iterable[nn.Parameter]): Parameters without an
            original.

    Returns:
        int: Number of parameter entries the optimizer now holds.
    """
    if optimizer.state:
        raise RuntimeError(
            'The optimizer already has state; a PEFT method must be applied '
            'before the first optimization step.')
    placed = set()
    for group in optimizer.param_groups:
        params = []
        for p in group['params']:
            if id(p) in replacements:
                stand_ins = [q for q in replacements[id(p)]
                             if id(q) not in placed]
                params.extend(stand_ins)
                placed.update(id(q) for q in stand_ins)
            elif p.requires_grad and id(p) not in placed:
                params.append(p)
                placed.add(id(p))
        group['params'] = params
    pending = [p for p in new_parameters if id(p) not in placed]
    if pending:
        optimizer.param_groups[0]['params'].extend(pending)
        placed.update(id(p) for p in pending)
    missing = [
        name for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in placed
    ]
    if missing:
        raise RuntimeError(
            'These trainable parameters are in no optimizer group (were they '
            f'frozen when the optimizer was built?): {missing[:5]}')
    return len(placed)
