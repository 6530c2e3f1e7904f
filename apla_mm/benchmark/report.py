"""Benchmark outputs: a markdown table, a JSON file and a PNG chart."""
import json
import os
import textwrap
import os.path as osp
from typing import Dict, List, Optional, Sequence

MB = 2**20


def _mb(x: Optional[float]) -> str:
    return '–' if x is None else f'{x / MB:,.1f}'


def _count(x: int) -> str:
    if x >= 1e6:
        return f'{x / 1e6:.2f}M'
    if x >= 1e3:
        return f'{x / 1e3:.1f}K'
    return str(x)


def _gflop(x: int) -> str:
    return f'{x / 1e9:,.1f}'


def _ratio(x: Optional[float]) -> str:
    return '–' if x is None else f'{x:.3f}x'


def _sec(x: Optional[float]) -> str:
    if x is None:
        return '–'
    return f'{x * 1e3:.1f} ms' if x < 1 else f'{x:.3f} s'


def settings_line(meta: dict) -> str:
    v = meta['versions']
    return (f"{meta['task']} | model {meta['model']} | input "
            f"{meta['size']}x{meta['size']} | batch {meta['batch']} | "
            f"{meta['device_name']} ({meta['device']}, {meta['threads']} "
            f"threads) | torch {v['torch']} | {_precision(meta)}, "
            f"{meta['optimizer']}"
            + (' | abstract account (fake tensors)' if meta.get('abstract')
               else '')
            + (f" | SDPA {meta['sdpa']}" if meta.get('sdpa', 'auto') !=
               'auto' else ''))


PRECISION_NAMES = dict(fp32='float32', bf16='bf16 autocast',
                       fp16='fp16 autocast')


_TORCH_DTYPES = dict(bf16='torch.bfloat16', fp16='torch.float16')


def _precision(meta: dict) -> str:
    names = meta.get('precisions') or [meta.get('precision', 'fp32')]
    return ' and '.join(PRECISION_NAMES.get(p, p) for p in names)


def _delta(p: dict) -> str:
    b = p.get('delta_file_bytes')
    return '–' if b is None else f'{b / MB:,.2f}'


def precision_table(results: dict, precision: str) -> List[str]:
    """The memory account of every method under one precision."""
    lines = [
        '| Method | Weights | Grads | AdamW state | Saved act. | Recompute | '
        '**Total** | x ref |', '|' + '---|' * 8
    ]
    for r in results['methods']:
        m = r['accounts'][precision]
        lines.append(
            f"| {r['label']} | {_mb(m['weights'])} | {_mb(m['grads'])} | "
            f"{_mb(m['optimizer'])} | {_mb(m['saved'])} | "
            f"{_mb(m['recompute'])} | **{_mb(m['total'])}** | "
            f"{_ratio(r['ratios'].get('memory_' + precision))} |")
    return lines


def _section(lines: List[str], heading: Optional[str], intro: str,
             columns: Sequence[str]) -> None:
    """Append a blank line, a ``##`` heading (if any), an intro paragraph
    and the header of a table with ``columns``."""
    lines.append('')
    if heading:
        lines.append(f'## {heading}')
        lines.append('')
    lines.append(intro)
    lines.append('')
    lines.append('| ' + ' | '.join(columns) + ' |')
    lines.append('|' + '---|' * len(columns))


def markdown(results: dict, title: Optional[str] = None) -> str:
    """The results as markdown tables (parameters/memory, time, and where
    the saved activations go)."""
    meta, methods = results['meta'], results['methods']
    ref = meta['reference']
    lines: List[str] = []
    lines.append(f"# {title or 'apla_mm benchmark'}")
    lines.append('')
    lines.append(f'**Settings**: {settings_line(meta)}.  ')
    timed = any('train_time' in r for r in methods)
    timing = (f"timing: {meta['steps']} training steps "
              f"({meta.get('infer_steps', meta['steps'])} inference passes) "
              f"after {meta['warmup']} warm-up, methods interleaved; "
              if timed else '')
    lines.append(
        f"Base config: `{meta['base_config']}`; {timing}"
        f"ratios (x ref) relative to `{ref}`; {meta['date']}, "
        f"mmseg {meta['versions']['mmseg']}, mmdet "
        f"{meta['versions']['mmdet']}, timm {meta['versions']['timm']}.")
    _section(
        lines, 'Parameters and training memory, '
        + PRECISION_NAMES.get(meta.get('precision', 'fp32'), 'float32'),
        'Exact account of one training step in MB (2^20 bytes): weights + '
        'gradients + AdamW state + tensors saved for backward (+ the '
        'largest recomputed region with activation checkpointing). '
        '"Peak (measured)": a fresh process per method, increment of the '
        'peak resident set size (GPU: `max_memory_allocated`) over the '
        'process after a discarded warm round (imports, thread pools, '
        'caches); it adds allocator slack and temporaries to the account.',
        ('Method', 'Trainable', 'Trainable %', 'Total params',
         'Delta file (MB)', 'Weights', 'Grads', 'AdamW state', 'Saved act.',
         'Recompute', '**Total**', 'x ref', 'Peak (measured)', 'x ref'))
    for r in methods:
        p, m, q = r['params'], r['memory'], r['ratios']
        peak = r.get('peak', {}).get('increment')
        lines.append(
            f"| {r['label']} | {_count(p['trainable'])} | "
            f"{p['trainable_pct']:.3f} | {_count(p['total'])} | "
            f"{_delta(p)} | {_mb(m['weights'])} | "
            f"{_mb(m['grads'])} | {_mb(m['optimizer'])} | "
            f"{_mb(m['saved'])} | {_mb(m['recompute'])} | "
            f"**{_mb(m['total'])}** | {_ratio(q['memory'])} | {_mb(peak)} | "
            f"{_ratio(q.get('peak'))} |")
    for precision in (meta.get('precisions') or [])[1:]:
        lines.append('')
        lines.append(f'## Training memory, {PRECISION_NAMES[precision]}')
        lines.append('')
        if precision == 'fp32':
            lines.append('The same account without autocast (float32 '
                         'throughout).')
        else:
            lines.append(
                'The same account with the forward pass and the losses '
                f'under `torch.autocast({meta["device"].split(":")[0]!r}, '
                f'{_TORCH_DTYPES[precision]})`: '
                'weights, gradients and AdamW state stay float32 (except '
                'frozen weights stored in low precision, `+lp`); '
                'activations of the matrix products are half size, and '
                'autocast saves the low-precision copies of the weights it '
                'casts.')
        lines.append('')
        lines.extend(precision_table(results, precision))
    if any('abstract_check' in r for r in methods):
        _section(
            lines, 'Abstract account vs real account',
            'The same account on fake tensors (no arithmetic, no weights '
            'allocated): total and relative difference.',
            ('Method', 'Precision', 'Real (MB)', 'Abstract (MB)',
             'Difference', 'Components that differ'))
        for r in methods:
            for p, c in r.get('abstract_check', {}).items():
                lines.append(
                    f"| {r['label']} | {PRECISION_NAMES[p]} | "
                    f"{_mb(r['accounts'][p]['total'])} | {_mb(c['total'])} "
                    f"| {c['rel_diff']:+.2e} | "
                    f"{', '.join(c['differing']) or 'none'} |")
    subs = [(r['label'], p, a['substitutions']) for r in methods
            for p, a in r.get('accounts', {}).items()
            if a.get('substitutions')]
    if subs:
        lines.append('')
        lines.append(
            'Abstract account: data-dependent operators answered by '
            'assumption (see `apla_mm/benchmark/abstract.py`): '
            + '; '.join(sorted({
                f"`{g['op']}` in `{g['where']}` ({g['assumption']})"
                for _, _, gs in subs for g in gs})) + '.')
    if any('flops' in r for r in methods):
        parts = sorted({part for r in methods
                        for part in r.get('flops', {}).get(
                            'forward_by_part', {})})
        _section(
            lines, 'Arithmetic of a training step',
            'Floating-point operations of forward (with the losses) and '
            'backward (with any recomputation), counted by '
            '`torch.utils.flop_counter.FlopCounterMode` (matrix products, '
            'convolutions, attention), in GFLOP; the floor of the step '
            'time, free of timing noise. Then the forward operations per '
            'part (layers run inside a checkpointed region of the heads, '
            '`+heads`, are counted for the whole model instead of their '
            'part).',
            ('Method', 'Forward', 'Backward', '**Total**', 'x ref',
             *(f'fwd {p}' for p in parts)))
        for r in methods:
            f = r.get('flops')
            if f is None:
                continue
            lines.append(
                f"| {r['label']} | {_gflop(f['forward'])} | "
                f"{_gflop(f['backward'])} | **{_gflop(f['total'])}** | "
                f"{_ratio(r['ratios'].get('flops'))} | "
                + ' | '.join(_gflop(f['forward_by_part'].get(p, 0))
                             for p in parts)
                + ' |')
    if any('train_time' in r for r in methods):
        _section(
            lines, 'Time',
            'Training step = zero_grad + forward + backward + AdamW step '
            '(+ APLA row sync); inference = eval-mode forward under '
            '`torch.no_grad()` of the trained model (LoRA merged), relative '
            f"to the base model (`{meta.get('inference_base')}`). Median "
            '[quartiles] (min-max).',
            ('Method', 'Train step', '[Q1, Q3]', 'min-max', 'x ref',
             'Inference', '[Q1, Q3]', 'x base'))
        for r in methods:
            t, i, q = r['train_time'], r['infer_time'], r['ratios']
            lines.append(
                f"| {r['label']} | {_sec(t['median'])} | [{_sec(t['q1'])}, "
                f"{_sec(t['q3'])}] | {_sec(t['min'])}-{_sec(t['max'])} | "
                f"{_ratio(q['train_time'])} | {_sec(i['median'])} | "
                f"[{_sec(i['q1'])}, {_sec(i['q3'])}] | "
                f"{_ratio(q['infer_time'])} |")
    lines.append('')
    lines.append('## Where the saved activations go')
    lines.append('')
    lines.append('Saved-for-backward bytes per top-level module, then the '
                 'largest groups (module pattern, module type, torch '
                 'function that saved it), MB.')
    lines.append('')
    for r in methods:
        m = r['memory']
        parts = ', '.join(f"{g['where']} {_mb(g['bytes'])}"
                          for g in m['saved_by_part'])
        lines.append(f"**{r['label']}** (saved {_mb(m['saved'])}: "
                     f'{parts or "nothing"}'
                     + (f"; recompute {_mb(m['recompute'])} of "
                        f"{m['checkpointed_regions']} checkpointed regions"
                        if m['checkpointed_regions'] else '') + ')')
        lines.append('')
        for g in m['saved_top'][:8]:
            lines.append(f"- `{g['where']}` ({g['type']}, `{g['fn']}`): "
                         f"{_mb(g['bytes'])} in {g['count']} tensors")
        for g in m['recompute_top'][:4]:
            lines.append(f"- recomputed in backward, largest region: "
                         f"`{g['where']}` ({g['type']}, `{g['fn']}`): "
                         f"{_mb(g['bytes'])} in {g['count']} tensors")
        lines.append('')
    return '\n'.join(lines) + '\n'


#: The memory account's components in the chart: key, legend, colour.
_COMPONENTS = (('weights', 'weights', '#9e9e9e'),
               ('grads', 'grads', '#ef8a62'),
               ('optimizer', 'AdamW state', '#f4c542'),
               ('saved', 'saved activations', '#67a9cf'),
               ('recompute', 'recompute (ckpt)', '#2166ac'))


def _memory_panel(ax, methods: List[dict], y: List[int]) -> None:
    """Stacked bars of the exact account per method, the measured peak as
    a diamond, the total as text."""
    left = [0.0] * len(methods)
    for key, name, color in _COMPONENTS:
        vals = [r['memory'][key] / MB for r in methods]
        ax.barh(y, vals, left=left, color=color, label=name)
        left = [a + b for a, b in zip(left, vals)]
    peaks = [r.get('peak', {}).get('increment') for r in methods]
    if any(p is not None for p in peaks):
        ax.scatter([p / MB for p in peaks if p is not None],
                   [yi for yi, p in zip(y, peaks) if p is not None],
                   marker='D', color='k', zorder=3, s=18,
                   label='measured peak')
    right = [max(t, (p or 0) / MB) for t, p in zip(left, peaks)]
    for yi, total, x in zip(y, left, right):
        ax.text(x, yi, f'  {total:,.0f}', va='center', fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([r['label'] for r in methods])
    ax.set_xlabel('training memory, MB (exact account'
                  + ('; diamond: measured peak)'
                     if any(p is not None for p in peaks) else ')'))
    ax.set_xlim(0, max(right) * 1.2)


def _time_panel(ax, methods: List[dict], y: List[int], key: str,
                xlabel: str) -> None:
    """Bars of the median time per method (``key``: ``train_time`` or
    ``infer_time``) with the interquartile range and the ratio."""
    med = [r[key]['median'] for r in methods]
    lo = [r[key]['median'] - r[key]['q1'] for r in methods]
    hi = [r[key]['q3'] - r[key]['median'] for r in methods]
    ax.barh(y, med, xerr=[lo, hi], color='#5e9c76', capsize=2)
    for yi, r, m, h in zip(y, methods, med, hi):
        ratio = r['ratios'].get(key)
        ax.text(m + h, yi, f'  {ratio:.2f}x' if ratio else '',
                va='center', fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.25)


def chart(results: dict, path: str, title: Optional[str] = None) -> None:
    """PNG: exact memory by component (measured peak as a marker), training
    step time and inference time per method."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    meta, methods = results['meta'], results['methods']
    y = list(range(len(methods)))[::-1]
    timed = all('train_time' in r for r in methods)
    ncols = 3 if timed else 1
    fig, axes = plt.subplots(
        1, ncols, figsize=(6.5 * ncols, 1.6 + 0.45 * len(methods)),
        squeeze=False, sharey=True)
    _memory_panel(axes[0][0], methods, y)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc='lower left', ncol=len(names),
               fontsize=8, frameon=False, bbox_to_anchor=(0.01, 0.0))
    if timed:
        _time_panel(axes[0][1], methods, y, 'train_time',
                    'training step, s (median, IQR)')
        _time_panel(axes[0][2], methods, y, 'infer_time',
                    'inference, s (median, IQR)')
    settings = textwrap.fill(settings_line(meta), width=int(95 * ncols))
    fig.suptitle((title or 'apla_mm benchmark') + '\n' + settings,
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.45 / (1.6 + 0.45 * len(methods)), 1, 1))
    # nothing cut off: the long method labels and the settings lines
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)


def write_outputs(results: dict, out_dir: str, name: str = 'benchmark',
                  title: Optional[str] = None) -> Dict[str, str]:
    """Write ``<name>.md``, ``<name>.json``, ``<name>.png`` into
    ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: osp.join(out_dir, f'{name}.{ext}')
             for ext in ('md', 'json', 'png')}
    with open(paths['md'], 'w') as f:
        f.write(markdown(results, title))
    with open(paths['json'], 'w') as f:
        json.dump(results, f, indent=1, default=str)
    chart(results, paths['png'], title)
    return paths
