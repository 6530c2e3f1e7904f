"""One target grammar for every PEFT method: which weights of a model adapt.

A method's ``targets`` is a string or a list of strings; each one is

* a **shortcut**, the same for every method:

  - ``'proj'``: the attention output projections W_O
    (:data:`ATTN_OUT_PATTERNS`), APLA's default;
  - ``'qkv'``: the attention input projections (:data:`ATTN_QKV_PATTERNS`);

* or a **regex**, full-matched (:func:`re.fullmatch`) against the names of
  ``model.named_modules()`` (e.g. ``'backbone.vit.blocks.*.attn.proj'``). The
  shortcut words are reserved: a module literally named ``proj`` at the top
  level is ``'(?:proj)'``.

Each matching module contributes one 2-D weight, found by
:func:`adapted_weight`: ``weight`` of a linear layer, or ``in_proj_weight``
of a :class:`torch.nn.MultiheadAttention` (mmseg's ViT keeps its query/key/
value projection there). Matches are looked for only inside the method's
``frozen_modules``. No match, or a match without such a weight, is an error
that names the modules found there and the fix (HF peft's
``check_target_module_exists``).

The same names drive activation checkpointing: :func:`enclosing_block` finds
the transformer block around an attention projection
(``checkpoint_blocks`` in :mod:`apla_mm.memory.checkpointing`).
"""
import re
from dataclasses import dataclass
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

#: Shortcut target names, the same for every method.
TARGET_SHORTCUTS: Dict[str, Dict[str, str]] = {
    'proj': ATTN_OUT_PATTERNS,
    'qkv': ATTN_QKV_PATTERNS,
}

#: A transformer block: timm ``blocks.N`` (also Swin's ``stages.N.blocks.M``),
#: mmseg/mmpretrain ``layers.N``.
BLOCK_PATTERN = re.compile(r'(?:.*\.)?(?:blocks|layers)\.\d+')

#: Where ``nn.MultiheadAttention`` keeps its input projection.
MHA_WEIGHT = 'in_proj_weight'

Targets = Union[str, Sequence[str], None]


class TargetNotFoundError(ValueError):
    """No module of the model matches the requested target patterns."""


@dataclass
class Target:
    """One weight a method adapts: ``module.<param>`` (``out x in``)."""
    name: str
    module: nn.Module
    param: str

    @property
    def weight(self) -> nn.Parameter:
        return self.module._parameters[self.param]

    @property
    def shape(self) -> Tuple[int, int]:
        out_features, in_features = self.weight.shape
        return out_features, in_features


def normalise_targets(targets: Targets) -> Optional[Tuple[str, ...]]:
    """``None`` or a tuple of strings (what configs store and compare)."""
    if targets is None:
        return None
    if isinstance(targets, str):
        return (targets, )
    targets = tuple(targets)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise TypeError('targets must be a shortcut or regex string, or a '
                        f'non-empty list of them, got {targets!r}')
    return targets


def resolve_targets(targets: Targets,
                    default: Sequence[str] = ('proj', )) -> List[str]:
    """Full-match regexes for ``targets`` (``None`` means ``default``),
    with the shortcuts of :data:`TARGET_SHORTCUTS` expanded."""
    out: List[str] = []
    for target in normalise_targets(targets) or tuple(default):
        if target in TARGET_SHORTCUTS:
            out.extend(TARGET_SHORTCUTS[target].values())
        else:
            out.append(target)
    return out


def adapted_weight(name: str, module: nn.Module) -> str:
    """Name of the 2-D weight a target module contributes.

    ``in_proj_weight`` for :class:`torch.nn.MultiheadAttention`, ``weight``
    otherwise; raises :class:`TypeError` naming the module if there is no
    such 2-D parameter.
    """
    param = MHA_WEIGHT if isinstance(module, nn.MultiheadAttention) \
        else 'weight'
    weight = module._parameters.get(param)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        raise TypeError(
            f'target {name!r} ({type(module).__name__}) has no 2-D parameter '
            f'{param!r}; targets must be linear layers (out_features x '
            'in_features weights) or nn.MultiheadAttention modules.')
    return param


def _inside(name: str, within: Sequence[str]) -> bool:
    return any(not p or name == p or name.startswith(p + '.')
               for p in within)


def find_modules(model: nn.Module,
                 patterns: Sequence[str],
                 within: Sequence[str] = ('', )
                 ) -> List[Tuple[str, nn.Module]]:
    """Modules whose full name matches one of ``patterns``.

    Args:
        model (nn.Module): Model to search (names are relative to it).
        patterns (Sequence[str]): Regexes, each matched with
            :func:`re.fullmatch` against ``model.named_modules()`` names.
        within (Sequence[str]): Only names equal to or under one of these
            prefixes count (``''`` = the whole model).

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
    found = [(name, module) for name, module in model.named_modules()
             if _inside(name, within)
             and any(c.fullmatch(name) for c in compiled)]
    if not found:
        scope = [p for p in within if p] or ['the model']
        classes = [type(model.get_submodule(p) if p else model).__name__
                   for p in within]
        examples = [
            n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and _inside(n, within)
        ][:6]
        raise TargetNotFoundError(
            f'No module of {", ".join(scope)} ({", ".join(classes)}) matches '
            f'the target patterns {list(patterns)}. '
            + (f'Linear layers there are named like {examples}; '
               if examples else 'It has no nn.Linear layers at all; ')
            + 'pass `targets=<regex>` (full match on module names) or a '
            f'shortcut ({", ".join(map(repr, TARGET_SHORTCUTS))}) that '
            'selects the layers to adapt.')
    return found


def find_targets(model: nn.Module, targets: Targets,
                 within: Sequence[str],
                 default: Sequence[str] = ('proj', )) -> List[Target]:
    """The weights ``targets`` selects inside the modules ``within``.

    Args:
        model (nn.Module): The full model; names are relative to it.
        targets (str | list[str], optional): Shortcuts and/or regexes (see
            the module docstring); ``None`` means ``default``.
        within (Sequence[str]): Top-level modules to search (the method's
            ``frozen_modules``).
        default (Sequence[str]): Targets used for ``None``.

    Returns:
        list[Target]: In module order; errors as :func:`find_modules` and
        :func:`adapted_weight`.
    """
    found = find_modules(model, resolve_targets(targets, default), within)
    return [Target(name, module, adapted_weight(name, module))
            for name, module in found]


def enclosing_block(name: str) -> str:
    """The nearest ancestor of module ``name`` that is a transformer block
    (:data:`BLOCK_PATTERN`), e.g. ``backbone.vit.blocks.3`` for
    ``backbone.vit.blocks.3.attn.proj``."""
    parts = name.split('.')
    for end in range(len(parts) - 1, 0, -1):
        candidate = '.'.join(parts[:end])
        if BLOCK_PATTERN.fullmatch(candidate):
            return candidate
    raise ValueError(
        f'checkpoint_blocks: found no transformer block (a module named '
        f'"blocks.N" or "layers.N") around {name!r}; checkpoint the backbone '
        'with its own switch instead (e.g. with_cp=True in its config).')
