"""Finding the layers a PEFT method adapts inside a model."""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

#: Attention output projections W_O of the ViT families we know, as full-match
#: regexes over module names. timm's VisionTransformer (DeiT, AugReg, DINOv2
#: with or without registers), Eva (EVA-02), VisionTransformerSAM and Beit all
#: name W_O ``blocks.N.attn.proj``; Swin's window attention keeps it at
#: ``stages.N.blocks.M.attn.w_msa.proj`` (mmseg and mmdet alike). mmseg's
#: ``VisionTransformer`` keeps W_O inside ``torch.nn.MultiheadAttention``
#: (``attn.attn.out_proj``), whose forward reads ``out_proj.weight`` without
#: calling ``out_proj``.
ATTN_OUT_PATTERNS: Dict[str, str] = {
    'timm ViT, EVA-02, SAM, BEiT (blocks.N.attn.proj)':
    r'(?:.*\.)?blocks\.\d+\.attn\.proj',
    'mmseg/mmdet SwinTransformer (stages.N.blocks.M.attn.w_msa.proj)':
    r'(?:.*\.)?stages\.\d+\.blocks\.\d+\.attn\.w_msa\.proj',
    'mmseg VisionTransformer (layers.N.attn.attn.out_proj)':
    r'(?:.*\.)?layers\.\d+\.attn\.attn\.out_proj',
    'mmpretrain VisionTransformer (layers.N.attn.proj)':
    r'(?:.*\.)?layers\.\d+\.attn\.proj',
}

#: Attention input projections (query/key/value) of the same families.
ATTN_QKV_PATTERNS: Dict[str, str] = {
    'timm ViT (blocks.N.attn.qkv)': r'(?:.*\.)?blocks\.\d+\.attn\.qkv',
    'mmseg VisionTransformer (layers.N.attn.attn, in_proj_weight)':
    r'(?:.*\.)?layers\.\d+\.attn\.attn',
    'mmpretrain VisionTransformer (layers.N.attn.qkv)':
    r'(?:.*\.)?layers\.\d+\.attn\.qkv',
}

Patterns = Union[str, Sequence[str], None]


class TargetNotFoundError(ValueError):
    """No module of the model matches the requested target patterns."""


def as_pattern_list(patterns: Patterns,
                    defaults: Dict[str, str]) -> List[str]:
    """Normalise user patterns; ``None`` means the known defaults."""
    if patterns is None:
        return list(defaults.values())
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError('targets must be a regex string or a non-empty list '
                        f'of regex strings, got {patterns!r}')
    return patterns


def find_modules(model: nn.Module,
                 patterns: Sequence[str],
                 within: Sequence[str] = ('', ),
                 weight_name: Optional[str] = 'weight'
                 ) -> List[Tuple[str, nn.Module]]:
    """Modules whose full name matches one of ``patterns``.

    Args:
        model (nn.Module): Model to search (names are relative to it).
        patterns (Sequence[str]): Regexes, each matched with
            :func:`re.fullmatch` against ``model.named_modules()`` names.
        within (Sequence[str]): Only names equal to or under one of these
            prefixes count (``''`` = the whole model).
        weight_name (str, optional): Required 2-D parameter on each match.

    Returns:
        list[tuple[str, nn.Module]]: Matches in module order. Raises
        :class:`TargetNotFoundError` if there are none.
    """
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f'invalid target regex {pattern!r}: {e}') from e

    def inside(name: str) -> bool:
        return any(not p or name == p or name.startswith(p + '.')
                   for p in within)

    found = []
    for name, module in model.named_modules():
        if not inside(name) or not any(c.fullmatch(name) for c in compiled):
            continue
        if weight_name is not None:
            weight = getattr(module, weight_name, None)
            if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
                raise TypeError(
                    f'target {name!r} ({type(module).__name__}) has no 2-D '
                    f'parameter {weight_name!r}; targets must be linear '
                    'layers (out_features x in_features weights).')
        found.append((name, module))
    if not found:
        scope = [p for p in within if p] or ['the model']
        classes = []
        for prefix in within:
            sub = model.get_submodule(prefix) if prefix else model
            classes.append(type(sub).__name__)
        examples = [
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and inside(n)
        ][:6]
        raise TargetNotFoundError(
            f'No module of {", ".join(scope)} ({", ".join(classes)}) matches '
            f'the target patterns {list(patterns)}. '
            + (f'Linear layers there are named like {examples}; '
               if examples else 'It has no nn.Linear layers at all; ')
            + 'pass `targets=<regex>` (full match on module names) that '
            'selects the attention output projections.')
    return found
