"""Run the whole benchmark: parameters, memory, time, for every method."""
import datetime
import gc
import os
import os.path as osp
import platform
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mmengine.config import Config

from .account import account_step
from .edits import config_size
from .peak import measure_peak
from .presets import config_methods, preset_methods
from .specs import MethodSpec, amp_of
from .flops import count_step_flops
from .timing import interleaved
from .trainee import Trainee


@dataclass
class BenchmarkOptions:
    """Settings of one benchmark run (the CLI's arguments).

    Args:
        task: ``'seg'``, ``'det'`` or ``'backbone'`` (a preset), or None
            with ``configs``.
        model: Preset model size, ``'tiny'`` or ``'vit-b16'``.
        configs: Config files, one method each (instead of a preset).
        methods: Keep only these methods (preset names or config stems);
            preset names not in the preset's default list are added.
        size: Input height = width (default: the preset's / config's).
        batch: Images per step (default: the preset's, 2 with configs).
        steps: Timed training repetitions.
        warmup: Discarded repetitions before them.
        infer_steps: Timed inference repetitions (default ``2 * steps``:
            a forward pass is cheap and noisier).
        device: ``'cpu'`` or ``'cuda'`` (``'cuda:N'``).
        peak: Measure the peak memory in a fresh process per method.
        peak_steps: Training steps of each peak-measuring process.
        timing: Measure step and inference times.
        reference: Method the ratios refer to (default ``full`` if
            present, else the first method).
        seed: Seed of the models and the synthetic batch.
        threads: ``torch.set_num_threads`` (default: torch's).
        progress: Show a tqdm progress bar.
        precisions: The exact account is computed for each: ``'fp32'``,
            ``'bf16'``, ``'fp16'`` (autocast of the device; weights,
            gradients and AdamW state float32). Timing and the peak use the
            first. Default: float32 only.
        abstract: Compute the accounts on fake tensors
            (:mod:`~apla_mm.benchmark.abstract`): no weights allocated, no
            arithmetic; no timing and no peak then.
        sdpa: Attention kernel (:mod:`~apla_mm.benchmark.sdpa`).
        check_abstract: Also compute every account on fake tensors and
            report its difference to the real one (validation of the
            abstract account).
        abstract_accounts: Time (and measure peaks of) the real models,
            but take the memory accounts from the abstract ones (equal, and
            seconds instead of a real training step per method).
        flops: Count the floating-point operations of one training step
            per method (:mod:`~apla_mm.benchmark.flops`; on the abstract
            model with ``abstract`` or ``abstract_accounts``).
    """
    task: Optional[str] = 'seg'
    model: str = 'tiny'
    configs: Sequence[str] = ()
    methods: Sequence[str] = ()
    size: Optional[int] = None
    batch: Optional[int] = None
    steps: int = 5
    warmup: int = 2
    infer_steps: Optional[int] = None
    device: str = 'cpu'
    peak: bool = True
    peak_steps: int = 2
    timing: bool = True
    reference: Optional[str] = None
    seed: int = 0
    threads: Optional[int] = None
    progress: bool = True
    top: int = 30
    precisions: Sequence[str] = ('fp32', )
    abstract: bool = False
    sdpa: str = 'auto'
    check_abstract: bool = False
    abstract_accounts: bool = False
    flops: bool = False


def _versions() -> dict:
    out = dict(torch=torch.__version__, python=platform.python_version())
    for name in ('mmengine', 'mmcv', 'mmseg', 'mmdet', 'timm', 'apla_mm'):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover
            out[name] = None
    return out


def device_description(device: str) -> str:
    dev = torch.device(device)
    if dev.type == 'cuda':
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return f'CPU ({os.cpu_count()} cores, {cpu})'


def select_specs(opts: BenchmarkOptions, precision: str = 'fp32'):
    """The method specs and the resolved size/batch (for one precision:
    ``+lp`` and ``+all`` depend on it)."""
    if opts.configs:
        specs = config_methods(opts.configs, opts.size,
                               list(opts.methods) or None)
        if not specs:
            raise ValueError('--methods removed every config')
        batch = opts.batch or 2
        size = opts.size or config_size(specs[0].cfg, specs[0].task)
        return specs, size, batch, specs[0].source
    specs, preset = preset_methods(opts.task, opts.model, opts.size,
                                   list(opts.methods) or None,
                                   amp=amp_of(precision))
    return specs, preset['size'], opts.batch or preset['batch'], \
        preset.get('base', 'BenchViTClassifier')


class _Progress:

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit='step', dynamic_ncols=True)

    def __call__(self, text: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description(text[:40])
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_benchmark(opts: BenchmarkOptions) -> dict:
    """Measure every method; returns the results (see ``report.py``)."""
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts: BenchmarkOptions) -> dict:
    dev = torch.device(opts.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('--device cuda, but torch sees no GPU')
    precisions = list(opts.precisions) or ['fp32']
    for p in precisions:
        amp_of(p)
    if len(set(precisions)) != len(precisions):
        raise ValueError(f'precisions repeat: {precisions}')
    if opts.abstract and (opts.timing or opts.peak):
        raise ValueError(
            'the abstract account (fake tensors) computes nothing, so it '
            'has no times and no peak: add --no-timing --no-peak, or drop '
            '--abstract.')
    spec_sets = {p: select_specs(opts, p)[0] for p in precisions}
    specs, size, batch, base_source = select_specs(opts, precisions[0])
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f'duplicate method names {names}')
    reference = opts.reference or ('full' if 'full' in names else names[0])
    if reference not in names:
        raise ValueError(f'reference {reference!r} is not among {names}')
    task = specs[0].task
    n = len(specs)
    reps = opts.warmup + opts.steps
    infer_steps = opts.infer_steps or 2 * opts.steps
    need_base = opts.timing and 'full' not in names and not opts.configs
    total = (1 + len(precisions)) * n + (n * reps + (n + need_base) *
                                          (opts.warmup + infer_steps)
                                          if opts.timing else 0)
    total += n if opts.peak else 0
    progress = _Progress(total, opts.progress)

    meta = dict(
        task=task,
        model=opts.model if not opts.configs else 'configs',
        base_config=base_source,
        size=size,
        batch=batch,
        steps=opts.steps,
        warmup=opts.warmup,
        infer_steps=infer_steps,
        device=str(dev),
        device_name=device_description(opts.device),
        threads=torch.get_num_threads(),
        reference=reference,
        optimizer='AdamW (lr 1e-4, weight decay 0.01)',
        precision=precisions[0],
        precisions=precisions,
        abstract=opts.abstract,
        check_abstract=opts.check_abstract,
        abstract_accounts=opts.abstract_accounts,
        sdpa=opts.sdpa,
        flops=opts.flops,
        date=datetime.datetime.now().isoformat(timespec='seconds'),
        versions=_versions())
    results = {s.name: dict(name=s.name, label=s.label, source=s.source)
               for s in specs}

    if opts.check_abstract and (opts.abstract or dev.type != 'cpu'):
        raise ValueError('--check-abstract compares a real CPU account with '
                         'the abstract one; drop --abstract / use --device '
                         'cpu.')

    def build(spec, precision, abstract=opts.abstract):
        return Trainee(spec, batch, size, opts.device, seed=opts.seed,
                       amp=amp_of(precision), abstract=abstract,
                       sdpa=opts.sdpa)

    def check(spec, precision, real):
        if not opts.check_abstract:
            return
        fake = account_step(build(spec, precision, abstract=True),
                            top=opts.top)
        keys = ('weights', 'grads', 'optimizer', 'saved', 'recompute',
                'total')
        results[spec.name].setdefault('abstract_check', {})[precision] = \
            dict(total=fake['total'],
                 rel_diff=(fake['total'] - real['total']) / real['total'],
                 differing=[k for k in keys if fake[k] != real[k]])

    trainees = {}
    try:
        for spec in specs:
            trainees[spec.name] = build(spec, precisions[0])
            progress(f'build {spec.name}')
        for spec in specs:
            t = trainees[spec.name]
            results[spec.name]['params'] = t.parameter_report()
            counted = (build(spec, precisions[0], abstract=True)
                       if opts.abstract_accounts else t)
            results[spec.name]['memory'] = account_step(counted,
                                                        top=opts.top)
            if opts.flops:  # the same model: operations need no values
                results[spec.name]['flops'] = count_step_flops(counted)
            del counted
            results[spec.name]['accounts'] = {
                precisions[0]: results[spec.name]['memory']}
            check(spec, precisions[0], results[spec.name]['memory'])
            progress(f'account {spec.name}')
        for precision in precisions[1:]:
            for spec in spec_sets[precision]:
                other = build(spec, precision,
                              abstract=opts.abstract or
                              opts.abstract_accounts)
                results[spec.name]['accounts'][precision] = account_step(
                    other, top=opts.top)
                del other
                check(spec, precision,
                      results[spec.name]['accounts'][precision])
                gc.collect()
                progress(f'account {spec.name} {precision}')
        if opts.timing:
            train = interleaved(
                {s.name: trainees[s.name].train_step for s in specs}, dev,
                opts.steps, opts.warmup,
                lambda name: progress(f'train {name}'))
            for name, stats in train.items():
                results[name]['train_time'] = stats
            calls = {}
            if need_base:
                base_spec = MethodSpec('(base)', 'base model', task,
                                       _base_cfg(opts))
                trainees['(base)'] = build(base_spec, precisions[0])
            for name, t in trainees.items():
                t.prepare_inference()
                calls[name] = t.infer
            infer = interleaved(calls, dev, infer_steps, opts.warmup,
                                lambda name: progress(f'infer {name}'))
            base_name = '(base)' if need_base else (
                'full' if 'full' in names else reference)
            meta['inference_base'] = base_name
            if need_base:
                meta['inference_base_time'] = infer.pop('(base)')
            for name, stats in infer.items():
                results[name]['infer_time'] = stats
            base_median = (meta['inference_base_time']['median']
                           if need_base else infer[base_name]['median'])
    finally:
        trainees.clear()
        gc.collect()
        if dev.type == 'cuda':
            torch.cuda.empty_cache()

    if opts.peak:
        with tempfile.TemporaryDirectory() as tmp:
            for spec in specs:
                path = osp.join(tmp, f'{_safe(spec.name)}.py')
                spec.cfg.dump(path)
                results[spec.name]['peak'] = measure_peak(
                    path, spec.name, task, size, batch, opts.device,
                    steps=opts.peak_steps, seed=opts.seed,
                    threads=opts.threads, amp=amp_of(precisions[0]),
                    sdpa=opts.sdpa)
                progress(f'peak {spec.name}')
    progress.close()

    ref = results[reference]
    for name, r in results.items():
        ratios = {}
        ratios['memory'] = r['memory']['total'] / ref['memory']['total']
        for precision, account in r['accounts'].items():
            ratios[f'memory_{precision}'] = (
                account['total'] / ref['accounts'][precision]['total'])
        if 'flops' in r:
            ratios['flops'] = r['flops']['total'] / ref['flops']['total']
        if 'peak' in r:
            ratios['peak'] = (r['peak']['increment'] /
                              max(ref['peak']['increment'], 1))
        if 'train_time' in r:
            ratios['train_time'] = (r['train_time']['median'] /
                                    ref['train_time']['median'])
            ratios['infer_time'] = r['infer_time']['median'] / base_median
        r['ratios'] = ratios
    return dict(meta=meta, methods=[results[s.name] for s in specs])


def _safe(name: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_' else '_' for c in name)


def _base_cfg(opts: BenchmarkOptions) -> Config:
    """The preset's base config (full fine-tuning) for the inference
    reference when ``full`` is not among the methods."""
    precision = (list(opts.precisions) or ['fp32'])[0]
    base_specs, _ = preset_methods(opts.task, opts.model, opts.size,
                                   ['full'], amp=amp_of(precision))
    return base_specs[0].cfg


__all__ = ['BenchmarkOptions', 'run_benchmark']
