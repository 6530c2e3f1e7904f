"""Method names and specs: what ``--methods`` accepts and what it means.

Method names:

========================  ===============================================
``full``                  full fine-tuning (the preset's base config)
``full-cp``               full fine-tuning, activation checkpointing of
                          the ViT blocks (= ``full+cp``)
``frozen``                frozen backbone: only neck and heads train
``apla-r<R>``             APLA, ``R`` output channels of every W_O
``apla-full``             APLA, all of W_O (``rank='full'``)
``apla-r<R>-cp``          APLA, block checkpointing (= ``apla-r<R>+cp``)
``lora-r<R>``             LoRA rank ``R`` on qkv and W_O (alpha 16)
``meta``                  the META-style adapter config of the preset
========================  ===============================================

Memory options (:data:`OPTIONS`, :mod:`apla_mm.memory`) are ``+`` suffixes:
``+cp`` (= ``-cp``: ``checkpoint_blocks``, the same mechanism for every
method), ``+lean``, ``+heads``, ``+lp`` (needs AMP), ``+sdpa``
and ``+all`` (every option that applies; :func:`resolve_options`), e.g.
``apla-r64+cp+lean``, ``full+all``. :mod:`.edits` turns a name into a
config, :mod:`.presets` lists each preset's names.
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence

from mmengine.config import Config

#: Precisions of the benchmark: float32 or an autocast dtype.
PRECISIONS = ('fp32', 'bf16', 'fp16')
#: Autocast precision -> ``torch`` dtype name.
AMP_DTYPES = {'bf16': 'bfloat16', 'fp16': 'float16'}


def check_amp(amp: Optional[str]) -> Optional[str]:
    """``amp`` if it is None (float32), ``'bf16'`` or ``'fp16'``.

    Raises:
        ValueError: Any other value.
    """
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f'amp must be None, bf16 or fp16, got {amp!r}')
    return amp


def amp_of(precision: str) -> Optional[str]:
    """The autocast name of a precision: None for ``'fp32'``.

    Raises:
        ValueError: ``precision`` is not one of :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got '
                         f'{precision!r}')
    return None if precision == 'fp32' else precision


_METHOD_RE = re.compile(
    r'^(?:(?P<full>full(?P<fullcp>-cp)?)|(?P<frozen>frozen)|(?P<meta>meta)|'
    r'apla-(?:r(?P<arank>\d+)|(?P<afull>full))(?P<acp>-cp)?|'
    r'lora-r(?P<lrank>\d+))$')

#: ``+option`` suffixes of a method name -> what they switch on (see the
#: module docstring and :mod:`apla_mm.memory`).
OPTIONS = {
    'cp': 'activation checkpointing of the ViT blocks',
    'lean': 'lean loss (only the low-resolution logits are kept; the '
    'upsampling and the loss are recomputed in backward)',
    'heads': 'activation checkpointing of the neck and the heads',
    'lp': 'frozen weights stored in the autocast dtype (needs AMP)',
    'sdpa': "fused attention (scaled_dot_product_attention) for mmseg's "
    'ViT',
    'all': 'every option that applies to the method and model',
}
_OPTION_LABELS = dict(cp='act. ckpt', lean='lean loss', heads='head ckpt',
                      lp='low-precision frozen', sdpa='SDPA')
_OPTION_ORDER = ('cp', 'lean', 'heads', 'lp', 'sdpa')


def _parse_options(name: str, suffixes: Sequence[str]) -> List[str]:
    options = []
    for opt in suffixes:
        if opt not in OPTIONS:
            raise ValueError(
                f'unknown option +{opt} in method {name!r}; options: '
                + ', '.join('+' + o for o in OPTIONS) + '.')
        if opt in options:
            raise ValueError(f'method {name!r} repeats +{opt}')
        options.append(opt)
    return options


def parse_method(name: str) -> dict:
    """``'apla-r64-cp'`` -> ``{'kind': 'apla', 'rank': 64, 'with_cp': True}``.

    Memory-option suffixes (``'apla-r64+cp+lean'``, ``'full+all'``) add
    ``'options'``: the list of options named (``+cp`` is the same as
    ``-cp``; ``+all`` stays ``'all'`` until :func:`resolve_options` knows
    the model and the precision).
    """
    base, *suffixes = name.split('+')
    m = _METHOD_RE.match(base)
    if m is None:
        raise ValueError(
            f'unknown method {name!r}; use full, full-cp, frozen, meta, '
            'apla-r<R>, apla-full, apla-r<R>-cp, apla-full-cp or lora-r<R>, '
            'optionally followed by memory options '
            + ''.join('+' + o for o in OPTIONS) + '.')
    options = _parse_options(name, suffixes)
    if m['full']:
        info = dict(kind='full', with_cp=bool(m['fullcp']))
    elif m['frozen']:
        info = dict(kind='frozen')
    elif m['meta']:
        info = dict(kind='meta')
    elif m['lrank']:
        info = dict(kind='lora', rank=int(m['lrank']))
    else:
        rank = 'full' if m['afull'] else int(m['arank'])
        if rank == 0:
            raise ValueError(f'{name}: rank must be > 0')
        info = dict(kind='apla', rank=rank, with_cp=bool(m['acp']))
    if options:
        if info['kind'] == 'meta':
            raise ValueError(f'{name}: the memory options apply to full '
                             'fine-tuning, frozen, APLA and LoRA, not META.')
        if 'cp' in options:
            if info['kind'] == 'frozen':
                raise ValueError(
                    f'{name}: a frozen backbone saves nothing for backward; '
                    'checkpointing it (+cp) changes nothing. Drop +cp.')
            if info.get('with_cp'):
                raise ValueError(f'{name}: -cp and +cp are the same option; '
                                 'give one.')
        if 'lp' in options and info['kind'] == 'full':
            raise ValueError(
                f'{name}: full fine-tuning has no frozen weights to store in '
                'low precision (+lp); use +lean/+heads/+cp, or +all.')
        info['options'] = options
    return info


def resolve_options(info: dict, amp: Optional[str] = None,
                    backbone_type: str = '') -> List[str]:
    """The concrete options of a parsed method: ``+all`` expanded for the
    method, model and precision (``lp`` only with AMP and frozen weights,
    ``cp`` not for a frozen backbone, ``sdpa`` only for mmseg's ViT, whose
    attention is not fused already), and ``-cp`` as ``cp``.

    Raises:
        ValueError: ``+lp`` without AMP.
    """
    options = list(info.get('options', ()))
    if info.get('with_cp'):
        options.append('cp')
    if 'all' in options:
        options.remove('all')
        wanted = ['lean', 'heads']
        if info['kind'] != 'frozen':
            wanted.append('cp')
        if amp and info['kind'] != 'full':
            wanted.append('lp')
        if backbone_type.endswith('VisionTransformer'):
            wanted.append('sdpa')
        options += [o for o in wanted if o not in options]
    if 'lp' in options and not amp:
        raise ValueError(
            '+lp stores the frozen weights in the autocast dtype and needs '
            'mixed precision: run with --amp bf16 (or fp16 on CUDA), or drop '
            '+lp.')
    return [o for o in _OPTION_ORDER if o in options]


def method_label(name: str) -> str:
    """Human-readable name of a preset method (config stems pass through)."""
    try:
        info = parse_method(name)
    except ValueError:
        return name
    kind = info['kind']
    options = list(info.get('options', ()))
    if info.get('with_cp'):
        options.insert(0, 'cp')
    suffix = ''.join(' + ' + ('all options' if o == 'all' else
                              _OPTION_LABELS[o]) for o in options)
    if kind == 'full':
        return 'Full fine-tuning' + suffix
    if kind == 'frozen':
        return 'Frozen backbone' + suffix
    if kind == 'meta':
        return 'META adapter'
    if kind == 'lora':
        return f"LoRA r={info['rank']} (qkv+proj)" + suffix
    rank = 'full W_O' if info['rank'] == 'full' else f"r={info['rank']}"
    return f'APLA {rank}' + suffix


@dataclass
class MethodSpec:
    """A method to benchmark: a name and the config that builds it.

    Args:
        name (str): The method name (:func:`parse_method`) or a config stem.
        label (str): Its human-readable name (:func:`method_label`).
        task (str): ``'seg'``, ``'det'`` or ``'backbone'``.
        cfg (Config): The config of the method.
        source (str): Where the config comes from (for the report).
    """
    name: str
    label: str
    task: str
    cfg: Config
    source: str = ''
