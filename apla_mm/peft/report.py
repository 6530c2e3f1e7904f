"""Trainable-parameter reports in the style of HF peft."""
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional

import torch.nn as nn


def count_parameters(model: nn.Module,
                     shadow: Iterable[nn.Parameter] = ()) -> Dict[str, dict]:
    """Trainable and total parameters per top-level module.

    Args:
        model (nn.Module): Model (unwrapped).
        shadow (Iterable[nn.Parameter]): Trainable parameters that stand for
            entries of existing weights (APLA's rows): they count as trainable
            but not again in the totals.

    Returns:
        dict: ``{part: {'trainable': int, 'total': int}}`` in module order,
        plus ``'all'``.
    """
    shadow_ids = {id(p) for p in shadow}
    parts: Dict[str, dict] = OrderedDict()
    for name, p in model.named_parameters():
        part = name.split('.', 1)[0] if '.' in name else '(root)'
        entry = parts.setdefault(part, dict(trainable=0, total=0))
        if p.requires_grad:
            entry['trainable'] += p.numel()
        if id(p) not in shadow_ids:
            entry['total'] += p.numel()
    parts['all'] = dict(
        trainable=sum(v['trainable'] for v in parts.values()),
        total=sum(v['total'] for v in parts.values()))
    return parts


def format_report(parts: Dict[str, dict],
                  title: Optional[str] = None,
                  notes: Optional[Dict[str, str]] = None) -> str:
    """Render :func:`count_parameters` output.

    The first line is HF peft's
    ``trainable params: X || all params: Y || trainable%: Z``, followed by
    one line per top-level module.
    """
    total = parts['all']
    pct = 100.0 * total['trainable'] / max(total['total'], 1)
    lines: List[str] = []
    if title:
        lines.append(title)
    lines.append(f"trainable params: {total['trainable']:,} || "
                 f"all params: {total['total']:,} || trainable%: {pct:.4f}")
    width = max(len(k) for k in parts)
    for name, entry in parts.items():
        if name == 'all':
            continue
        share = 100.0 * entry['trainable'] / max(entry['total'], 1)
        note = f'  ({notes[name]})' if notes and name in notes else ''
        lines.append(f"  {name:<{width}}  trainable {entry['trainable']:>12,}"
                     f" / {entry['total']:>12,}  ({share:6.2f}%){note}")
    return '\n'.join(lines)
