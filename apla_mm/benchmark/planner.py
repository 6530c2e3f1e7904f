"""What fits in a memory budget: a planner on the exact (abstract) account.

``tools/plan.py CONFIG --memory 24GB`` answers, for the config's model,
input size and precision, which settings of APLA fit (rank, activation
checkpointing, lean loss, head checkpointing, low-precision frozen weights,
batch size) and how much stock full fine-tuning (and full fine-tuning with
the same savings) would need.

How it computes, in seconds and without allocating a weight:

* every figure is the exact account of :func:`~apla_mm.benchmark.account.
  account_step` on fake tensors (:mod:`~apla_mm.benchmark.abstract`):
  weights + gradients + AdamW state + saved activations + the largest
  recomputed region;
* the activations are computed for each *ladder* of memory options (stock,
  ``+cp``, ``+cp+lean``, ``+cp+lean+heads``, every option) at batch 1 and
  batch 2; an activation account is affine in the batch (every saved
  tensor has the batch as a dimension, or none), so ``saved(b) = saved(1)
  + (b - 1) * (saved(2) - saved(1))`` holds for every batch (checked by the
  tests);
* the activations do not depend on APLA's rank (the rows' weight gradient
  needs each W_O's whole input, whatever ``r``: checked by the tests), so
  they are computed at one rank; the static part (weights, gradients,
  AdamW state) is counted per rank on the built (fake) model: the unique
  storages of all parameters and buffers, plus three times those of the
  trainable parameters (a gradient and AdamW's two moments of each).

Several GPUs (``--gpus N``): with ``--strategy ddp`` (the default) every
GPU holds the whole account, as above. With ``--strategy fsdp``
(:class:`~apla_mm.engine.strategies.PortableFSDPStrategy`) FSDP shards each
unit's flattened parameters over the N GPUs (padded to a multiple of N), and
with them their gradients and AdamW state: per GPU, the parameters,
gradients and optimizer state are divided by N (rounded up), buffers and
activations are not (each GPU runs its own batch). Not counted: the
unsharded parameters (and, for trainable units, gradients) of the unit FSDP
is gathering at a moment, one transformer block (two with prefetching),
nor gradient memory FSDP gives frozen parameters in units that mix them
with trainable ones (its wrap plan logs how much).

Results are cached (``work_dirs/plan_cache``, keyed by the config, size,
precision, attention kernel and torch version), so asking again with another
budget is instant.
"""
import hashlib
import json
import os
import os.path as osp
import re
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from apla_mm.utils.cli import task_of
from .account import MB, account_step, unique_bytes, weight_bytes
from .edits import (MODEL_TASKS, apply_method, backbone_cfg, config_size,
                    set_input_size, strip_method)
from .presets import PRESETS, preset_base
from .specs import (MethodSpec, amp_of, method_label, parse_method,
                    resolve_options)
from .trainee import Trainee

GiB = 2**30

#: The option ladders, from the fastest (nothing recomputed) to the leanest.
LADDER: Tuple[Tuple[str, ...], ...] = (
    (), ('cp', ), ('cp', 'lean'), ('cp', 'lean', 'heads'), ('all', ))

_UNITS = {'': GiB, 'b': 1, 'k': 2**10, 'kb': 2**10, 'kib': 2**10,
          'm': MB, 'mb': MB, 'mib': MB, 'g': GiB, 'gb': GiB, 'gib': GiB,
          't': 2**40, 'tb': 2**40, 'tib': 2**40}


def parse_memory(text: str) -> int:
    """``'24GB'``, ``'24 GiB'``, ``'80g'``, ``'512MB'`` -> bytes.

    GB and GiB both mean 2^30 bytes (as GPU memory is quoted: a "24 GB"
    card has 24 GiB); a bare number is GiB.
    """
    m = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*', str(text))
    if m is None or m[2].lower() not in _UNITS:
        raise ValueError(f'cannot read the memory size {text!r}; write e.g. '
                         '24GB, 24GiB, 80g or 512MB.')
    return int(float(m[1]) * _UNITS[m[2].lower()])


@dataclass
class PlanOptions:
    """What to plan.

    Args:
        source: A config file (any method of it: the planner starts from
            its full fine-tuning form) or a preset ``'task/model'``, e.g.
            ``'seg/dinov2-g14'``.
        memory: The budget in bytes (:func:`parse_memory`).
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast).
        batch: The batch the answer is for (default 2).
        batches: Batch sizes tried for the largest batch that fits.
        ranks: APLA ranks.
        reserve: Bytes of the budget kept free for what the account does
            not hold (allocator slack, kernel workspaces, short-lived
            temporaries, the CUDA context). Default 1 GiB.
        size: Input size (default: the config's / preset's).
        sdpa: Attention kernel of the target device
            (:mod:`~apla_mm.benchmark.sdpa`; ``'flash'`` / ``'efficient'``
            for a GPU).
        cache_dir: Where accounts are cached (None: no cache).
        ladder: The APLA option sets tried (default :data:`LADDER`).
        gpus: GPUs the run uses (default 1).
        strategy: ``'ddp'`` (every GPU holds everything) or ``'fsdp'``
            (parameters, gradients and optimizer state sharded over
            ``gpus``).
    """
    source: str
    memory: int
    precision: str = 'fp32'
    batch: int = 2
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32)
    ranks: Sequence[int] = (16, 64, 256)
    reserve: int = GiB
    size: Optional[int] = None
    sdpa: str = 'auto'
    cache_dir: Optional[str] = 'work_dirs/plan_cache'
    ladder: Sequence[Sequence[str]] = LADDER
    gpus: int = 1
    strategy: str = 'ddp'

    def __post_init__(self) -> None:
        if self.strategy not in ('ddp', 'fsdp'):
            raise ValueError(f'strategy {self.strategy!r}: use ddp or fsdp.')
        if int(self.gpus) < 1:
            raise ValueError(f'gpus={self.gpus}: give at least 1.')


def shard(nbytes: int, gpus: int) -> int:
    """Bytes per GPU of ``nbytes`` sharded over ``gpus`` (FSDP pads a flat
    parameter to a multiple of the world size: rounded up)."""
    return -(-int(nbytes) // int(gpus))


def load_source(source: str, size: Optional[int] = None):
    """``(base config, task, size, description)`` of a config file or a
    ``'task/model'`` preset."""
    if not osp.isfile(source) and '/' in source and \
            tuple(source.split('/', 1)) in PRESETS:
        task, model = source.split('/', 1)
        base, desc = preset_base(task, model)
        size = size or PRESETS[(task, model)]['size']
    else:
        if not osp.isfile(source):
            presets = ', '.join(f'{t}/{m}' for t, m in PRESETS)
            raise FileNotFoundError(
                f'{source!r} is neither a config file nor a preset; presets: '
                f'{presets}.')
        from mmengine.config import Config
        cfg = Config.fromfile(source)
        task = task_of(cfg, MODEL_TASKS)
        base = strip_method(cfg, task)
        desc = source
        size = size or config_size(cfg, task)
    if task == 'det':
        raise ValueError(
            'the planner works on the abstract account, and a detector\'s '
            'proposal sampling is data dependent; plan a seg or backbone '
            'config, or measure a detector with tools/benchmark.py det (real '
            'account).')
    return base, task, size, desc


class Planner:
    """Abstract accounts of one base config, cached.

    Args:
        opts (PlanOptions): The plan.
    """

    def __init__(self, opts: PlanOptions) -> None:
        self.opts = opts
        self.amp = amp_of(opts.precision)
        self.base, self.task, self.size, self.desc = load_source(
            opts.source, opts.size)
        key = json.dumps(dict(cfg=self.base.pretty_text, size=self.size,
                              precision=opts.precision, sdpa=opts.sdpa,
                              torch=torch.__version__, v=2), sort_keys=True)
        self.key = hashlib.sha1(key.encode()).hexdigest()[:16]
        self.cache: Dict[str, dict] = {}
        self._cache_file = None
        if opts.cache_dir:
            self._cache_file = osp.join(opts.cache_dir, f'{self.key}.json')
            if osp.isfile(self._cache_file):
                with open(self._cache_file) as f:
                    self.cache = json.load(f)
        self.computed = 0

    def _save(self) -> None:
        if self._cache_file:
            os.makedirs(osp.dirname(self._cache_file), exist_ok=True)
            with open(self._cache_file, 'w') as f:
                json.dump(self.cache, f)

    def _spec(self, name: str) -> MethodSpec:
        cfg = apply_method(self.base, name, self.task, amp=self.amp)
        set_input_size(cfg, self.task, self.size)
        return MethodSpec(name, method_label(name), self.task, cfg)

    def _trainee(self, name: str, batch: int) -> Trainee:
        return Trainee(self._spec(name), batch, self.size, 'cpu',
                       amp=self.amp, abstract=True, sdpa=self.opts.sdpa)

    def account(self, name: str, batch: int) -> dict:
        """The abstract account of method ``name`` at ``batch`` (bytes)."""
        key = f'account|{name}|{batch}'
        if key not in self.cache:
            a = account_step(self._trainee(name, batch), attribute=False)
            self.cache[key] = {
                k: a[k]
                for k in ('weights', 'grads', 'optimizer', 'saved',
                          'recompute', 'total')
            }
            self.cache[key]['substitutions'] = a['substitutions']
            self.computed += 1
            self._save()
        return self.cache[key]

    def static(self, name: str) -> dict:
        """Weights and 3 x trainable bytes of method ``name`` (no
        forward pass): what the account holds besides activations. Only
        the method, its rank and ``+lp`` change them (checkpointing, the
        lean loss and fused attention change forward passes only), so one
        build serves every such option set."""
        info = parse_method(name)
        backbone = backbone_cfg(self.base, self.task).get('type', '')
        lp = 'lp' in resolve_options(info, self.amp, backbone)
        name = name.split('+')[0].replace('-cp', '') + ('+lp' if lp else '')
        key = f'static|{name}'
        if key not in self.cache:
            t = self._trainee(name, 2)
            trainable = unique_bytes(t.params)
            self.cache[key] = dict(
                weights=weight_bytes(t.model),
                params=unique_bytes(list(t.model.parameters())),
                grads=trainable, optimizer=2 * trainable)
            self.computed += 1
            self._save()
        return self.cache[key]

    def activations(self, name: str) -> Tuple[int, int]:
        """``(saved + recompute at batch 2, per extra image)`` (batch 2 and
        3: a training batch of 1 is refused by the heads' batch norms after
        global pooling)."""
        two, three = self.account(name, 2), self.account(name, 3)
        a2 = two['saved'] + two['recompute']
        a3 = three['saved'] + three['recompute']
        return a2, a3 - a2

    def total(self, name: str, batch: int,
              static_name: Optional[str] = None) -> int:
        """Account total of ``name`` at ``batch``; the activations of
        ``name``, the static part of ``static_name`` (another rank)."""
        a2, per = self.activations(name)
        return self.static_per_gpu(static_name or name) + a2 + (
            batch - 2) * per

    def static_per_gpu(self, name: str) -> int:
        """Weights, gradients and AdamW state of ``name`` on one GPU: all
        of them (ddp), or the parameters, gradients and optimizer state
        sharded over the GPUs and the buffers whole (fsdp)."""
        s = self.static(name)
        if self.opts.strategy != 'fsdp':
            return s['weights'] + s['grads'] + s['optimizer']
        gpus = self.opts.gpus
        buffers = s['weights'] - s['params']
        return buffers + shard(s['params'], gpus) + shard(
            s['grads'], gpus) + shard(s['optimizer'], gpus)


def _method(kind: str, rank: Optional[int], options: Sequence[str]) -> str:
    base = 'full' if kind == 'full' else f'apla-r{rank}'
    return base + ''.join('+' + o for o in options)


def plan(opts: PlanOptions) -> dict:
    """Every setting's memory at ``opts.batch`` and its largest batch in the
    budget; the recommendation; full fine-tuning's needs."""
    start = time.time()
    planner = Planner(opts)
    budget = opts.memory - opts.reserve
    if budget <= 0:
        raise ValueError(f'the reserve ({opts.reserve / GiB:.1f} GiB) leaves '
                         'nothing of the budget; lower --reserve.')
    ref_rank = 64 if 64 in opts.ranks else opts.ranks[0]
    batches = sorted(set(opts.batches) | {opts.batch})
    rows = []

    def add(kind: str, rank: Optional[int], options: Sequence[str]) -> None:
        name = _method(kind, rank, options)
        act_name = _method(kind, ref_rank if kind == 'apla' else None,
                           options)
        totals = {b: planner.total(act_name, b, static_name=name)
                  for b in batches}
        fits = [b for b in batches if totals[b] <= budget]
        _, per = planner.activations(act_name)
        rows.append(
            dict(method=name, label=method_label(name), kind=kind,
                 rank=rank, options=list(options),
                 total=totals[opts.batch], fits=totals[opts.batch] <= budget,
                 max_batch=max(fits) if fits else 0,
                 per_image=per, static=planner.static(name),
                 static_per_gpu=planner.static_per_gpu(name)))

    backbone = backbone_cfg(planner.base, planner.task).get('type', '')
    seen = set()
    ladder = [tuple(o) for o in opts.ladder]
    # full fine-tuning: stock, and with the leanest ladder step (no +lp:
    # it has no frozen weights)
    leanest = tuple(o for o in ladder[-1] if o != 'lp') if ladder else ()
    full_ladder = [()] + ([leanest] if leanest else [])
    for kind, ladder in (('apla', ladder), ('full', full_ladder)):
        for options in ladder:
            resolved = tuple(resolve_options(
                parse_method(_method(kind, 1, options)), planner.amp,
                backbone))
            if (kind, resolved) in seen:
                continue  # e.g. +all is +cp+lean+heads in float32
            seen.add((kind, resolved))
            for rank in (opts.ranks if kind == 'apla' else (None, )):
                add(kind, rank, options)
    apla_fit = [r for r in rows if r['kind'] == 'apla' and r['fits']]
    # fastest first (fewest recomputations), then the largest rank
    best = None
    for options in [tuple(o) for o in opts.ladder]:
        cands = [r for r in apla_fit if tuple(r['options']) == options]
        if cands:
            best = max(cands, key=lambda r: r['rank'])
            break
    full_rows = [r for r in rows if r['kind'] == 'full']
    subs = sorted({
        f"{s['op']} in {s['where']}"
        for k, v in planner.cache.items() if k.startswith('account|')
        for s in v.get('substitutions', [])
    })
    return dict(
        source=planner.desc, task=planner.task, size=planner.size,
        precision=opts.precision, sdpa=opts.sdpa, batch=opts.batch,
        gpus=opts.gpus, strategy=opts.strategy,
        memory=opts.memory, reserve=opts.reserve, budget=budget,
        rows=rows, best=best, full=full_rows[0], full_all=full_rows[-1],
        substitutions=subs, accounts_computed=planner.computed,
        seconds=time.time() - start, cache=planner._cache_file)


def _gib(x: float) -> str:
    return f'{x / GiB:,.2f}'


def format_plan(result: dict) -> str:
    """The plan as text (markdown tables)."""
    r = result
    prec = dict(fp32='float32', bf16='bf16 autocast',
                fp16='fp16 autocast')[r['precision']]
    lines = [
        f"Plan for {r['source']} ({r['task']}, {r['size']}x{r['size']}, "
        f"{prec}, AdamW, SDPA {r['sdpa']}): budget {_gib(r['memory'])} GiB "
        f"- reserve {_gib(r['reserve'])} GiB = {_gib(r['budget'])} GiB for "
        'the exact account (weights + grads + AdamW state + saved '
        'activations + largest recomputed region).', ''
    ]
    if r.get('strategy') == 'fsdp':
        lines[0] += (f" Per GPU of {r['gpus']} under FSDP: parameters, "
                     'gradients and AdamW state sharded over them, buffers '
                     'and activations not (the unit being gathered is not '
                     'counted).')
    elif r.get('gpus', 1) > 1:
        lines[0] += f" Per GPU of {r['gpus']} under DDP (each holds all)."
    b = r['batch']
    lines.append(f'| Setting | Memory at batch {b} (GiB) | Fits | '
                 'Largest batch that fits | per extra image (MiB) |')
    lines.append('|---|---|---|---|---|')
    for row in r['rows']:
        lines.append(
            f"| {row['label']} (`{row['method']}`) | {_gib(row['total'])} | "
            f"{'yes' if row['fits'] else 'no'} | "
            f"{row['max_batch'] or '-'} | {row['per_image'] / MB:,.0f} |")
    lines.append('')
    best, full, full_all = r['best'], r['full'], r['full_all']
    if best is not None:
        lines.append(
            f"Recommended (fastest that fits at batch {b}, largest rank): "
            f"**{best['label']}** (`{best['method']}`), "
            f"{_gib(best['total'])} GiB; up to batch {best['max_batch']}.")
    else:
        lines.append(f'No APLA setting fits at batch {b}; try a smaller '
                     'batch, bf16 autocast (--precision bf16) or a larger '
                     'budget.')
    pairs = [(full, 'Stock full fine-tuning')]
    if full_all['method'] != full['method']:
        pairs.append((full_all, f"{full_all['label']} "
                      f"(`{full_all['method']}`)"))
    for row, what in pairs:
        lines.append(
            f"{what} needs {_gib(row['total'])} GiB at batch {b} "
            + (f"(fits; up to batch {row['max_batch']})." if row['fits']
               else '(does not fit' + (
                   f"; batch {row['max_batch']} would)."
                   if row['max_batch'] else ' at any batch tried).')))
    if r['substitutions']:
        lines.append('Data-dependent operators answered by assumption: '
                     + ', '.join(r['substitutions']) + '.')
    lines.append(f"({r['accounts_computed']} accounts computed in "
                 f"{r['seconds']:.1f} s"
                 + (f"; cache {r['cache']}" if r['cache'] else '') + '.)')
    return '\n'.join(lines) + '\n'
