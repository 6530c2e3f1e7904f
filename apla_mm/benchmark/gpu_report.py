"""One report that checks a machine end to end: ``tools/gpu_report.py``.

Sections (see docs/gpu.md):

``memory``
    For every model, precision and method: the exact account
    (:func:`~.account.account_step`), the measured peak of a training
    step, their ratio, and the attention kernel that ran
    (:func:`sdpa_kernels`). The peak is taken in this process with a
    :class:`MemoryMeter` reset before each method's step
    (``torch.cuda.reset_peak_memory_stats`` /
    ``torch.cuda.max_memory_allocated`` on a GPU; the peak resident set
    size on a CPU), after a warm-up round, and cross-checked against the
    benchmark's fresh-process measurement (:func:`~.peak.measure_peak`)
    for one method per model; where they disagree every peak is taken in
    fresh processes instead.
``time``
    The median training step of each method (interleaved,
    :func:`~.timing.interleaved`, CUDA events on a GPU), its ratio to full
    fine-tuning next to the arithmetic ratio
    (:func:`~.flops.count_step_flops`), and the inference time of the
    merged APLA model against the base model.
``amp``
    The stock ``--amp`` path (:mod:`.amp_check`).
``detection``
    Optional: a Mask R-CNN training step on the device, when mmcv has
    compiled ops for it.

:func:`run_gpu_report` returns everything as a dict, :func:`write_report`
writes ``report.json`` and ``report.md``.
"""
import ctypes
import datetime
import gc
import os
import os.path as osp
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .account import account_step
from .flops import count_step_flops
from .peak import (measure_peak, peak_rss_bytes, reset_peak_rss, rss_bytes)
from .presets import preset_methods
from .runner import device_description
from .specs import amp_of, parse_method
from .timing import interleaved
from .trainee import Trainee

MiB = 2**20

#: What each report size measures: seg preset models, the methods (the
#: APLA rank and LoRA rank scaled to the model), the precisions.
FULL_PLAN = dict(
    models=('vit-b16', 'vit-l16'),
    methods=('full', 'frozen', 'apla-r64', 'apla-r64+all', 'lora-r16'),
    amp_iters=50, det_model='vit-b16', det_methods=('full', 'apla-r64'))
QUICK_PLAN = dict(
    models=('tiny', ),
    methods=('full', 'frozen', 'apla-r16', 'apla-r16+all', 'lora-r8'),
    amp_iters=6, det_model='tiny', det_methods=('full', 'apla-r16'))
#: Precisions of the memory and time sections; float16 (the stock
#: ``--amp``) for full fine-tuning and plain APLA only.
PRECISIONS = ('fp32', 'bf16', 'fp16')
FP16_KINDS = ('full', 'apla')

#: What the exact account does not hold, and the measured peak does.
ACCOUNT_LEAVES_OUT = (
    'The exact account holds what one training step keeps at once: '
    'weights and buffers, gradients, AdamW state, the tensors saved for '
    'backward and the largest recomputed region. It leaves out: the input '
    "batch; short-lived temporaries of single operations (a kernel's "
    'output before the next op consumes it, the gradients of activations '
    'in flight during backward); cuBLAS/cuBLASLt and cuDNN workspaces '
    '(allocated through the caching allocator on first use, then kept); '
    "the allocator's rounding (blocks of 512 bytes, 2 MiB segments for "
    'large tensors: max_memory_allocated counts rounded blocks, '
    'max_memory_reserved the segments); and what no tensor holds: the '
    'CUDA context (several hundred MiB per process, outside the '
    "allocator), loaded kernels, and the allocator's cached but free "
    'blocks (memory_reserved - memory_allocated). The measured peak is '
    'max_memory_allocated over one training step, minus what was allocated '
    'before the method was built: it has the batch, the temporaries, the '
    'workspaces first used in that step and the rounding, not the context.'
)


# ----------------------------------------------------------------------
# measuring memory in this process
class MemoryMeter:
    """Allocated memory of one device, read and reset in this process.

    On CUDA: ``torch.cuda.memory_allocated`` and
    ``max_memory_allocated`` (reset with ``reset_peak_memory_stats``). On a
    CPU: the resident set size (``VmRSS``) and its peak (``VmHWM``, reset
    through ``/proc/self/clear_refs``), with glibc told to return every
    freed buffer of 64 KiB or more at once (``mallopt(M_MMAP_THRESHOLD)``,
    what :func:`~.peak.measure_peak` does for its child processes through
    ``MALLOC_MMAP_THRESHOLD_``).

    Args:
        device (str): ``'cpu'`` or ``'cuda[:N]'``.
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == 'cuda'
        if self.cuda:
            self.kind = ('torch.cuda.max_memory_allocated, reset per method '
                         '(torch.cuda.reset_peak_memory_stats), this process')
        else:
            self.kind = ('peak resident set size (VmHWM, reset through '
                         '/proc/self/clear_refs), this process')
            _fixed_mmap_threshold()

    def settle(self) -> None:
        """Free what is garbage (and the allocator's cache on a GPU)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes('VmRSS') or 0

    def reset_peak(self) -> bool:
        """Start a new peak at the current value; False if impossible."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        return reset_peak_rss()

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def _fixed_mmap_threshold() -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, 65536)`` (no-op elsewhere)."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------
# which attention kernel runs
_KERNELS = {
    '_scaled_dot_product_flash_attention_for_cpu': 'flash-cpu',
    '_scaled_dot_product_flash_attention': 'flash',
    '_scaled_dot_product_efficient_attention': 'efficient',
    '_scaled_dot_product_cudnn_attention': 'cudnn',
    '_scaled_dot_product_fused_attention_overrideable': 'fused',
}


class _AttentionCalls(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', '') == 'scaled_dot_product_attention':
            self.calls += 1
        return func(*args, **(kwargs or {}))


class _AttentionKernels(TorchDispatchMode):
    """Records the fused attention kernels the dispatcher runs (the
    composite ``scaled_dot_product_attention`` has chosen one by then; the
    math fallback decomposes into matrix products and shows none)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        label = _KERNELS.get(name)
        if label is not None:
            if label == 'flash' and args and args[0].device.type == 'cpu':
                label = 'flash-cpu'  # torch 2.1's name for the CPU kernel
            self.kernels[label] = self.kernels.get(label, 0) + 1
        return func(*args, **(kwargs or {}))


def sdpa_kernels(trainee: Trainee) -> Dict[str, int]:
    """The attention kernels one forward pass (with the loss, gradients
    enabled, as in training) of ``trainee`` runs: ``{kernel: calls}``,
    ``'math'`` for calls of ``scaled_dot_product_attention`` that ran no
    fused kernel; empty for models without it."""
    calls, kernels = _AttentionCalls(), _AttentionKernels()
    trainee.zero_grad()
    with trainee.compute(), calls, kernels:
        loss = trainee.forward_loss()
    del loss
    out = dict(kernels.kernels)
    fused = sum(out.values())
    if calls.calls > fused:
        out['math'] = calls.calls - fused
    return out


def kernel_label(kernels: Dict[str, int]) -> str:
    """``{'flash': 24}`` -> ``'flash x24'``; ``'-'`` without attention."""
    if not kernels:
        return '-'
    return ', '.join(f'{k} x{n}' for k, n in sorted(kernels.items()))


# ----------------------------------------------------------------------
@dataclass
class GPUReportOptions:
    """Settings of :func:`run_gpu_report` (the command line's arguments).

    Args:
        out: Output folder (``report.md``, ``report.json``, the AMP runs).
        device: ``'cuda'`` (``'cuda:N'``) or ``'cpu'``.
        quick: Tiny models (:data:`QUICK_PLAN`) instead of ViT-B/16 and
            ViT-L/16 at 512 x 512 (:data:`FULL_PLAN`).
        models: Seg presets to measure (default: the plan's).
        methods: Methods (default: the plan's).
        precisions: Of :data:`PRECISIONS` (default: all that the device
            and torch support).
        steps: Timed training steps per method (at least 5).
        warmup: Discarded steps before them.
        amp_iters: Iterations of each stock ``--amp`` run (default: the
            plan's).
        sections: Of ``('memory', 'amp', 'detection')``; ``memory`` holds
            the time measurements too.
        peak_process: Measure every peak in a fresh process
            (:func:`~.peak.measure_peak`) instead of in this one.
        threads: ``torch.set_num_threads`` (default: torch's).
        build_info: JSON file with the install's timings (written by
            ``tools/gpu_check.sh``), copied into the report.
        time_budget: Seconds the whole report may take; what would start
            after that is skipped and listed (default: no limit).
        command: The command line, for the report.
    """
    out: str
    device: str = 'cuda'
    quick: bool = False
    models: Sequence[str] = ()
    methods: Sequence[str] = ()
    precisions: Sequence[str] = ()
    steps: int = 5
    warmup: int = 2
    amp_iters: Optional[int] = None
    sections: Sequence[str] = ('memory', 'amp')
    peak_process: bool = False
    threads: Optional[int] = None
    build_info: Optional[str] = None
    command: str = ''
    time_budget: Optional[float] = None
    log: bool = True
    plan: dict = field(default_factory=dict)


class _Clock:
    """The report's time budget."""

    def __init__(self, budget: Optional[float]) -> None:
        self.deadline = (None if budget is None else
                         time.perf_counter() + budget)
        self.skipped: List[str] = []

    def over(self, what: str) -> bool:
        """True (and ``what`` recorded as skipped) past the deadline."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            self.skipped.append(what)
            return True
        return False


def _log(opts: GPUReportOptions, text: str) -> None:
    if opts.log:
        print(f'[gpu_report {time.strftime("%H:%M:%S")}] {text}',
              flush=True)


def supported_precisions(device: str) -> Dict[str, Optional[str]]:
    """``{precision: None if it runs here, else why not}``."""
    from apla_mm.compat import TorchTooOld, grad_scaler
    dev = torch.device(device)
    out: Dict[str, Optional[str]] = dict(fp32=None, bf16=None, fp16=None)
    if dev.type == 'cuda' and not torch.cuda.is_bf16_supported():
        out['bf16'] = 'this GPU has no bfloat16'
    try:
        grad_scaler(dev.type)
    except TorchTooOld as e:
        out['fp16'] = str(e)
    return out


def machine_info(device: str) -> dict:
    """The machine, the device and the software versions."""
    dev = torch.device(device)
    info = dict(
        device=str(dev),
        device_name=device_description(device),
        host_cpu=device_description('cpu'),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cudnn=(torch.backends.cudnn.version()
               if torch.backends.cudnn.is_available() else None),
        threads=torch.get_num_threads())
    try:
        with open('/proc/meminfo') as f:
            info['host_memory_gib'] = round(
                int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if dev.type == 'cuda':
        props = torch.cuda.get_device_properties(dev)
        info.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f'{props.major}.{props.minor}',
            gpu_count=torch.cuda.device_count())
    for name in ('mmengine', 'mmcv', 'mmseg', 'mmdet', 'timm', 'apla_mm'):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # pragma: no cover - a missing package
            info[name] = f'not importable ({type(e).__name__})'
    return info


# ----------------------------------------------------------------------
class _Measurer:
    """Builds the methods of one group and measures each once built."""

    def __init__(self, opts: GPUReportOptions, meter: MemoryMeter) -> None:
        self.opts = opts
        self.meter = meter

    def build(self, spec, batch, size, amp):
        return Trainee(spec, batch, size, self.opts.device, amp=amp)

    def measure(self, spec, batch: int, size: int, amp: Optional[str],
                flops: bool = True) -> tuple:
        """Build ``spec`` and measure it; returns (row, trainee)."""
        meter = self.meter
        meter.settle()
        base = meter.current()
        start = time.perf_counter()
        trainee = self.build(spec, batch, size, amp)
        built = meter.current() - base
        account = account_step(trainee)
        retries = 0
        # a float16 step the loss scaler skipped created no AdamW state:
        # count again (the scaler lowered its scale meanwhile)
        while (trainee.scaler is not None and account['optimizer'] == 0
               and trainee.params and retries < 4):
            account = account_step(trainee)
            retries += 1
        kernels = sdpa_kernels(trainee)
        row = dict(name=spec.name, label=spec.label, precision=amp or 'fp32',
                   trainable=sum(p.numel() for p in trainee.params),
                   account=_account_summary(account), sdpa=kernels,
                   sdpa_label=kernel_label(kernels),
                   scaler_skipped_counts=retries, built_bytes=built)
        if flops:
            row['flops'] = count_step_flops(trainee)
        meter.settle()
        reset = meter.reset_peak()
        trainee.train_step()
        peak = meter.peak() - base
        row['peak'] = dict(bytes=peak, source='in-process', kind=meter.kind,
                           reset=reset)
        row['peak_over_account'] = peak / max(account['total'], 1)
        row['seconds'] = time.perf_counter() - start
        return row, trainee


def _account_summary(account: dict) -> dict:
    keys = ('weights', 'grads', 'optimizer', 'saved', 'recompute', 'total',
            'checkpointed_regions', 'precision', 'sdpa')
    return {k: account[k] for k in keys}


def _group_methods(methods: Sequence[str], precision: str) -> List[str]:
    if precision != 'fp16':
        return list(methods)
    out = []
    for name in methods:
        info = parse_method(name)
        if info['kind'] in FP16_KINDS and not info.get('options') \
                and not info.get('with_cp'):
            out.append(name)
    return out


def _fresh_peaks(jobs: Sequence[tuple], device: str,
                 threads: Optional[int], workers: int,
                 clock: '_Clock') -> List[Optional[dict]]:
    """:func:`~.peak.measure_peak` (a fresh process per method) for each
    ``(spec, size, batch, amp)``, ``workers`` processes at a time (each
    reads its own peak); None where the time budget ran out."""
    from concurrent.futures import ThreadPoolExecutor
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (spec, *_rest) in enumerate(jobs):  # dumped here: not in
            paths.append(osp.join(tmp, f'method{i}.py'))  # threads
            spec.cfg.dump(paths[-1])

        def one(i: int) -> Optional[dict]:
            spec, size, batch, amp = jobs[i]
            if clock.over(f'fresh-process peak: {spec.name} {amp or "fp32"}'
                          f' {size}x{size}'):
                return None
            result = measure_peak(paths[i], spec.name, spec.task, size,
                                  batch, device, steps=2, threads=threads,
                                  amp=amp)
            return dict(bytes=result['increment'], source='fresh process',
                        kind=result['kind'] + ' (apla_mm.benchmark.peak.'
                        'measure_peak: a new process per method, warm '
                        'round, 2 steps)',
                        reset=result.get('warm_round'))

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(one, range(len(jobs))))


def _merged_inference(trainees: Dict[str, Trainee], device: torch.device,
                      steps: int, warmup: int) -> Optional[dict]:
    """Inference of the merged APLA model (``merge_and_unload``: the base
    model's modules, trained weights) against the base model (full
    fine-tuning's, the same architecture), interleaved."""
    apla = next((n for n in trainees if parse_method(n)['kind'] == 'apla'
                 and not parse_method(n).get('options')), None)
    if 'full' not in trainees or apla is None:
        return None
    base, adapted = trainees['full'], trainees[apla]
    base.prepare_inference()
    adapted.prepare_inference()
    with torch.no_grad():
        before = adapted.infer()
        adapted.adapter.merge_and_unload()
        adapted.adapter = None
        after = adapted.infer()
    diff = max((a.float() - b.float()).abs().max().item()
               for a, b in zip(_tensors(before), _tensors(after)))
    stats = interleaved({'base': base.infer, 'merged': adapted.infer},
                        device, max(steps, 5), warmup, cuda_events=True)
    return dict(method=apla, base_median=stats['base']['median'],
                merged_median=stats['merged']['median'],
                ratio=stats['merged']['median'] / stats['base']['median'],
                merge_max_abs_diff=diff,
                merged_modules=sorted({type(m).__name__ for m in
                                       adapted.model.modules()
                                       if 'APLA' in type(m).__name__}))


def _tensors(output) -> List[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, dict):
        return [t for o in output.values() for t in _tensors(o)]
    return []


def memory_and_time(opts: GPUReportOptions, plan: dict,
                    clock: Optional[_Clock] = None) -> dict:
    """The memory and time sections: one group per (model, precision),
    float32 of every model first."""
    clock = clock or _Clock(None)
    meter = MemoryMeter(opts.device)
    device = torch.device(opts.device)
    measurer = _Measurer(opts, meter)
    support = supported_precisions(opts.device)
    precisions = list(opts.precisions or PRECISIONS)
    if not opts.precisions and device.type == 'cpu':
        support['fp16'] = support['fp16'] or (
            'float16 autocast on a CPU is emulated (seconds per step) and '
            "not what --amp runs there (bfloat16); it is a GPU precision "
            '(ask for it with --precisions fp16)')
    skipped = {p: support[p] for p in precisions if support.get(p)}
    precisions = [p for p in precisions if p not in skipped]
    groups = []
    cross_checks = []
    # a CPU's resident set cannot be reset reliably inside a process (freed
    # heap memory is reused without growing it): there every peak comes
    # from fresh processes, the in-process figure is kept for comparison
    use_fresh = opts.peak_process or not meter.cuda
    checked = set()
    for precision in precisions:
        for model in plan['models']:
            amp = amp_of(precision)
            names = _group_methods(plan['methods'], precision)
            if not names or clock.over(f'memory/time: {model} {precision}'):
                continue
            specs, preset = preset_methods('seg', model, methods=names,
                                           amp=amp)
            size, batch = preset['size'], preset['batch']
            _log(opts, f'{model} {precision}: {len(specs)} methods at '
                 f'{size}x{size}, batch {batch}')
            group_start = time.perf_counter()
            if not groups:
                # warm round: what a process allocates once (cuBLAS/cuDNN
                # workspaces, lazy imports, thread pools) before any
                # baseline is taken
                warm = measurer.build(specs[0], batch, size, amp)
                warm.train_step()
                del warm
            meter.settle()
            group_base = meter.current()
            rows, trainees = [], {}
            for spec in specs:
                row, trainee = measurer.measure(spec, batch, size, amp)
                rows.append(row)
                trainees[spec.name] = trainee
                _log(opts, f"  {spec.name}: account "
                     f"{row['account']['total'] / MiB:.1f} MiB, peak "
                     f"{row['peak']['bytes'] / MiB:.1f} MiB, "
                     f"{row['sdpa_label']}")
            timing = interleaved(
                {n: t.train_step for n, t in trainees.items()}, device,
                opts.steps, opts.warmup, cuda_events=True)
            inference = _merged_inference(trainees, device, opts.steps,
                                          opts.warmup)
            trainees.clear()
            meter.settle()
            left = meter.current() - group_base
            by_name = {r['name']: r for r in rows}
            ref = by_name.get('full', rows[0])
            for row in rows:
                row['train_time'] = timing[row['name']]
                row['time_ratio'] = (timing[row['name']]['median'] /
                                     timing[ref['name']]['median'])
                row['flops_ratio'] = (row['flops']['total'] /
                                      max(ref['flops']['total'], 1))
                row['account_ratio'] = (row['account']['total'] /
                                        ref['account']['total'])
            group = dict(model=model, precision=precision, size=size,
                         batch=batch, base_config=preset.get('base'),
                         reference=ref['name'], methods=rows,
                         inference=inference, left_allocated=left)
            if model not in checked and not use_fresh:
                checked.add(model)
                check = _cross_check(rows, specs, size, batch, opts, meter,
                                     clock)
                cross_checks.append(dict(model=model, **check))
                _log(opts, f"  cross-check {check['method']}: in-process "
                     f"{check['in_process'] / MiB:.1f} MiB, fresh process "
                     f"{check['fresh'] / MiB:.1f} MiB -> "
                     f"{'agree' if check['agree'] else 'DISAGREE'}")
                if not check['agree']:
                    use_fresh = True
            group['seconds'] = time.perf_counter() - group_start
            groups.append(group)
    if use_fresh:
        _log(opts, 'measuring every peak in a fresh process ('
             + ('asked for' if opts.peak_process else
                'a CPU' if not meter.cuda else
                'in-process peaks disagree with a fresh process') + ')')
        jobs, rows = [], []
        for group in groups:
            specs, _ = preset_methods(
                'seg', group['model'],
                methods=[r['name'] for r in group['methods']],
                amp=amp_of(group['precision']))
            for spec, row in zip(specs, group['methods']):
                jobs.append((spec, group['size'], group['batch'],
                             amp_of(group['precision'])))
                rows.append(row)
        # processes side by side: one per core on a CPU, two on a GPU
        workers = 2 if meter.cuda else max(1, min(4, os.cpu_count() or 1))
        for row, peak in zip(rows, _fresh_peaks(jobs, opts.device,
                                                opts.threads, workers,
                                                clock)):
            row['peak_in_process'] = row['peak']
            if peak is None:
                row['peak'] = dict(row['peak'], source='in-process (the '
                                   'fresh-process measurement was skipped: '
                                   'time budget)')
                continue
            row['peak'] = peak
            row['peak_over_account'] = (peak['bytes'] /
                                        row['account']['total'])
        for group in groups:
            if group['model'] not in checked:  # the same comparison, free
                checked.add(group['model'])
                cross_checks.append(dict(model=group['model'],
                                         **_compare(group, meter)))
    return dict(groups=groups, cross_checks=cross_checks,
                precisions_skipped=skipped, peak_meter=meter.kind,
                peaks_from_fresh_processes=use_fresh,
                account_leaves_out=ACCOUNT_LEAVES_OUT)


def _check_index(names: Sequence[str]) -> int:
    """The method the reset is checked on: plain APLA, else the first."""
    return next((i for i, n in enumerate(names)
                 if parse_method(n)['kind'] == 'apla'
                 and not parse_method(n).get('options')), 0)


def _agreement(method: str, precision: str, inside: int, fresh: int,
               cuda: bool) -> dict:
    """Tolerance: 2 % or 4 MiB on a GPU (allocated bytes are deterministic
    up to the workspaces a kernel choice needs), 10 % or 1 MiB for a CPU's
    resident set."""
    rel, floor = (0.02, 4) if cuda else (0.10, 1)
    agree = abs(inside - fresh) <= max(rel * max(fresh, 1), floor * MiB)
    return dict(method=method, precision=precision, in_process=inside,
                fresh=fresh, rel_diff=(inside - fresh) / max(fresh, 1),
                tolerance=f'{rel:.0%} or {floor} MiB', agree=bool(agree),
                decisive=cuda)


def _cross_check(rows, specs, size, batch, opts, meter, clock) -> dict:
    """One method's in-process peak against a fresh process's."""
    index = _check_index([s.name for s in specs])
    spec, row = specs[index], rows[index]
    fresh, = _fresh_peaks([(spec, size, batch, amp_of(row['precision']))],
                          opts.device, opts.threads, 1, _Clock(None))
    return _agreement(spec.name, row['precision'], row['peak']['bytes'],
                      fresh['bytes'], meter.cuda)


def _compare(group: dict, meter: MemoryMeter) -> dict:
    """The same comparison from peaks already measured both ways."""
    rows = group['methods']
    row = rows[_check_index([r['name'] for r in rows])]
    return _agreement(row['name'], row['precision'],
                      row['peak_in_process']['bytes'], row['peak']['bytes'],
                      meter.cuda)


# ----------------------------------------------------------------------
def mmcv_ops_on(device: str) -> Optional[str]:
    """None if mmcv's compiled ops run on ``device`` (an ``nms`` call),
    else why not."""
    try:
        from mmcv.ops import nms
        boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]],
                             device=device)
        nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'


def detection_section(opts: GPUReportOptions, plan: dict) -> dict:
    """A Mask R-CNN training step per method on the device (det preset),
    or why not."""
    problem = mmcv_ops_on(opts.device)
    if problem is not None:
        return dict(status='skipped', reason=(
            f'mmcv has no compiled ops for {opts.device} ({problem}); build '
            'mmcv with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<the GPU\'s '
            'capability> (tools/gpu_check.sh --detection)'))
    meter = MemoryMeter(opts.device)
    measurer = _Measurer(opts, meter)
    specs, preset = preset_methods('det', plan['det_model'],
                                   methods=list(plan['det_methods']))
    size, batch = preset['size'], preset['batch']
    warm = measurer.build(specs[0], batch, size, None)
    warm.train_step()
    del warm
    rows, trainees = [], {}
    for spec in specs:
        row, trainee = measurer.measure(spec, batch, size, None, flops=False)
        rows.append(row)
        trainees[spec.name] = trainee
        _log(opts, f"  det {spec.name}: account "
             f"{row['account']['total'] / MiB:.1f} MiB, peak "
             f"{row['peak']['bytes'] / MiB:.1f} MiB")
    timing = interleaved({n: t.train_step for n, t in trainees.items()},
                         torch.device(opts.device), opts.steps, opts.warmup,
                         cuda_events=True)
    trainees.clear()
    meter.settle()
    for row in rows:
        row['train_time'] = timing[row['name']]
    if opts.peak_process or not meter.cuda:  # as in the memory section
        peaks = _fresh_peaks([(spec, size, batch, None) for spec in specs],
                             opts.device, opts.threads, 2, _Clock(None))
        for row, peak in zip(rows, peaks):
            row['peak_in_process'], row['peak'] = row['peak'], peak
            row['peak_over_account'] = (peak['bytes'] /
                                        row['account']['total'])
    return dict(status='passed', model=plan['det_model'], size=size,
                batch=batch, base_config=preset.get('base'), methods=rows)


# ----------------------------------------------------------------------
def _checks(result: dict) -> List[dict]:
    """Named pass/fail verdicts over the whole report."""
    checks = []

    def add(name, ok, detail=''):
        checks.append(dict(name=name, passed=bool(ok), detail=detail))

    memory = result.get('memory')
    if memory:
        rows = [r for g in memory['groups'] for r in g['methods']]
        add('every account and measured peak is a positive number',
            rows and all(r['account']['total'] > 0 and r['peak']['bytes'] > 0
                         for r in rows), f'{len(rows)} measurements')
        for check in memory['cross_checks']:
            if check['decisive']:  # on a CPU the fresh processes count
                add(f"in-process peak agrees with a fresh process "
                    f"({check['model']}, {check['method']})",
                    check['agree'], f"{check['rel_diff']:+.1%} (tolerance "
                    f"{check['tolerance']})")
        for group in memory['groups']:
            inf = group.get('inference')
            if inf:
                add(f"merged APLA equals the adapted model "
                    f"({group['model']}, {group['precision']})",
                    inf['merge_max_abs_diff'] == 0 and
                    not inf['merged_modules'],
                    f"max |diff| {inf['merge_max_abs_diff']:.3g}")
        times = [r['train_time'].get('n', 0) for r in rows]
        add('every method timed over at least 5 steps',
            times and min(times) >= 5, f'min {min(times or [0])} steps')
    amp = result.get('amp')
    if amp:
        for run in amp['runs']:
            add(f"{run['tool']} tools/train.py"
                f"{' --amp' if 'amp_skipped' not in run else ''}: frozen "
                'entries bit-identical, every selected row moved',
                run.get('status') == 'passed',
                '; '.join(run.get('problems', [])))
            probe = run.get('probe', {})
            if probe.get('status') in ('passed', 'failed'):
                add(f"{run['tool']} tools/train.py --amp: the step with an "
                    'inf gradient was skipped and changed nothing',
                    probe['status'] == 'passed',
                    '; '.join(probe.get('problems', [])))
        direct = amp['trainee_skip_check']
        if direct['status'] != 'skipped':
            add('float16 loss scaler: a skipped step leaves W_O, rows and '
                'AdamW state unchanged (Trainee)',
                direct['status'] == 'passed',
                '; '.join(direct.get('problems', [])))
    det = result.get('detection')
    if det and det['status'] != 'skipped':
        add('Mask R-CNN trains a step on the device',
            det['status'] == 'passed' and all(
                r['peak']['bytes'] > 0 for r in det['methods']))
    return checks


def run_gpu_report(opts: GPUReportOptions) -> dict:
    """Run the report's sections; returns the result (see the module
    docstring). Each section's failure is recorded, not raised, so one
    broken part leaves the others' results."""
    import traceback
    dev = torch.device(opts.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError(
            '--device cuda, but torch sees no GPU (torch '
            f'{torch.__version__}, built for CUDA {torch.version.cuda}); '
            'use --device cpu --quick to check the code path on a CPU.')
    if opts.steps < 5:
        raise ValueError(f'steps must be at least 5, got {opts.steps}')
    unknown = set(opts.sections) - {'memory', 'amp', 'detection'}
    if unknown:
        raise ValueError(f'unknown sections {sorted(unknown)}; choose from '
                         'memory, amp, detection')
    plan = dict(QUICK_PLAN if opts.quick else FULL_PLAN)
    if opts.models:
        plan['models'] = tuple(opts.models)
    if opts.methods:
        plan['methods'] = tuple(opts.methods)
    if opts.amp_iters:
        plan['amp_iters'] = opts.amp_iters
    threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.makedirs(opts.out, exist_ok=True)
    start = time.perf_counter()
    result = dict(
        title='apla_mm GPU report' if dev.type == 'cuda' else
        'apla_mm GPU report (CPU run: the code path, not GPU figures)',
        command=opts.command,
        date=datetime.datetime.now().isoformat(timespec='seconds'),
        machine=machine_info(opts.device),
        options={k: v for k, v in asdict(opts).items()
                 if k not in ('plan', 'log')},
        plan=plan, seconds={}, errors={})
    if opts.build_info and osp.isfile(opts.build_info):
        import json
        with open(opts.build_info) as f:
            result['build'] = json.load(f)
    clock = _Clock(opts.time_budget)
    # the stock --amp runs first: short, and what most GPU users run
    sections = [('amp', lambda: _amp(opts, plan)),
                ('memory', lambda: memory_and_time(opts, plan, clock)),
                ('detection', lambda: detection_section(opts, plan))]
    try:
        for name, fn in sections:
            if name not in opts.sections or clock.over(f'section {name}'):
                continue
            _log(opts, f'section {name}')
            t0 = time.perf_counter()
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 - reported, not raised
                result['errors'][name] = (f'{type(e).__name__}: {e}\n' +
                                          traceback.format_exc()[-3000:])
                _log(opts, f'section {name} failed: {type(e).__name__}: {e}')
            result['seconds'][name] = time.perf_counter() - t0
            _finish(result, clock, start)
            write_report(result, opts.out)  # a partial report at each step
    finally:
        torch.set_num_threads(threads)
    _finish(result, clock, start)
    return result


def _finish(result: dict, clock: _Clock, start: float) -> None:
    result['seconds']['total'] = time.perf_counter() - start
    result['skipped'] = list(clock.skipped)
    result['checks'] = _checks(result)
    result['passed'] = (not result['errors'] and
                        all(c['passed'] for c in result['checks']))


def _amp(opts: GPUReportOptions, plan: dict) -> dict:
    from .amp_check import run_amp_section
    return run_amp_section(osp.join(opts.out, 'amp'), opts.device,
                           plan['amp_iters'])


# ----------------------------------------------------------------------
# outputs
def _mib(n: Optional[float]) -> str:
    return '-' if n is None else f'{n / MiB:,.1f}'


def _ms(stats: Optional[dict]) -> str:
    if not stats or not stats.get('n'):
        return '-'
    return f"{stats['median'] * 1e3:,.1f} (IQR {stats['iqr'] * 1e3:,.1f})"


def markdown(result: dict) -> str:
    """The report as markdown."""
    m = result['machine']
    parts = ', '.join(f'{k} {v:.0f} s' for k, v in result['seconds'].items()
                      if k != 'total')
    lines = [f"# {result['title']}", '',
             f"`{result['command']}`  ", f"{result['date']}, "
             f"{result['seconds'].get('total', 0):.0f} s in all ({parts}).",
             '', '## Machine', '',
             f"- device: {m['device']} — {m['device_name']}"
             + (f", {m.get('gpu_memory_gib')} GiB, compute capability "
                f"{m.get('capability')}" if 'capability' in m else ''),
             f"- host: {m['host_cpu']}, {m.get('host_memory_gib', '?')} GiB;"
             f" {m['platform']}; {m['threads']} torch threads",
             f"- Python {m['python']}, torch {m['torch']} (CUDA "
             f"{m['torch_cuda']}, cuDNN {m['cudnn']}), mmcv {m['mmcv']}, "
             f"mmengine {m['mmengine']}, mmseg {m['mmseg']}, mmdet "
             f"{m['mmdet']}, timm {m['timm']}, apla_mm {m['apla_mm']}"]
    if result.get('build'):
        lines.append('- install: ' + ', '.join(
            f'{k} {v}' for k, v in result['build'].items()))
    lines += ['', '## Checks', '']
    for c in result['checks']:
        lines.append(f"- {'PASS' if c['passed'] else 'FAIL'}: {c['name']}"
                     + (f" ({c['detail']})" if c['detail'] else ''))
    for name, err in result['errors'].items():
        lines.append(f'- FAIL: section {name} raised '
                     f"`{err.splitlines()[0]}`")
    for what in result.get('skipped', []):
        lines.append(f'- not run (time budget): {what}')
    memory = result.get('memory')
    if memory:
        lines += ['', '## Memory: exact account vs measured peak', '',
                  'Peak: ' + (
                      'every peak measured in a fresh process per method '
                      '(apla_mm.benchmark.peak.measure_peak: '
                      + memory['groups'][0]['methods'][0]['peak']['kind']
                      .split(' (apla_mm')[0] + ')'
                      if memory['peaks_from_fresh_processes'] and
                      memory['groups'] else memory['peak_meter'])
                  + '. UperNet (mmseg), timm ViT, AdamW, one training step.'
                  ]
        for p, why in memory['precisions_skipped'].items():
            lines.append(f'{p} not measured: {why}.')
        for g in memory['groups']:
            lines += ['', f"### {g['model']}, {g['precision']}, "
                      f"{g['size']}x{g['size']}, batch {g['batch']}", '',
                      '| method | trainable | account MiB | peak MiB | '
                      'peak / account | account / full | SDPA kernel |',
                      '|---|---:|---:|---:|---:|---:|---|']
            for r in g['methods']:
                lines.append(
                    f"| {r['label']} | {r['trainable']:,} | "
                    f"{_mib(r['account']['total'])} | "
                    f"{_mib(r['peak']['bytes'])} | "
                    f"{r['peak_over_account']:.3f} | "
                    f"{r['account_ratio']:.3f} | {r['sdpa_label']} |")
        lines += ['', 'What the account leaves out: ' +
                  memory['account_leaves_out'], '']
        for c in memory['cross_checks']:
            lines.append(
                f"Reset check ({c['model']}, {c['method']}, "
                f"{c['precision']}): in this process "
                f"{_mib(c['in_process'])} MiB, in a fresh process "
                f"{_mib(c['fresh'])} MiB ({c['rel_diff']:+.1%}, tolerance "
                f"{c['tolerance']}): {'agree' if c['agree'] else 'differ'}"
                + ('.' if c['decisive'] else ' (for information: on a CPU '
                   'the fresh-process figures are the measurement).'))
        lines += ['', '## Time: training step (median of the timed steps)',
                  '', 'Interleaved round-robin'
                  + (', CUDA events' if m['device'].startswith('cuda')
                     else ', host clock') +
                  f"; {result['options']['warmup']} warm-up + "
                  f"{result['options']['steps']} timed steps per method. "
                  'Arithmetic: floating-point operations of forward + '
                  'backward (FlopCounterMode), the noise-free floor.', '',
                  '| model | precision | method | step ms | time / full | '
                  'arithmetic / full | GFLOP |',
                  '|---|---|---|---:|---:|---:|---:|']
        for g in memory['groups']:
            for r in g['methods']:
                lines.append(
                    f"| {g['model']} | {g['precision']} | {r['label']} | "
                    f"{_ms(r['train_time'])} | {r['time_ratio']:.3f} | "
                    f"{r['flops_ratio']:.3f} | "
                    f"{r['flops']['total'] / 1e9:,.1f} |")
        lines += ['', '### Inference: merged APLA model vs the base model',
                  '', '| model | precision | APLA | base ms | merged ms | '
                  'merged / base | max abs diff after merging |',
                  '|---|---|---|---:|---:|---:|---:|']
        for g in memory['groups']:
            inf = g.get('inference')
            if inf:
                lines.append(
                    f"| {g['model']} | {g['precision']} | {inf['method']} | "
                    f"{inf['base_median'] * 1e3:,.2f} | "
                    f"{inf['merged_median'] * 1e3:,.2f} | "
                    f"{inf['ratio']:.3f} | {inf['merge_max_abs_diff']:.3g} |")
    amp = result.get('amp')
    if amp:
        lines += ['', '## The stock `--amp` path', '',
                  f"Config `{amp['config']}`, {amp['iterations']} "
                  f"iterations; an inf gradient injected at iteration "
                  f"{amp['probe_iteration']} (one entry of an APLA row).",
                  '', '| run | result | frozen bit-identical | selected '
                  'rows moved | skipped step | loss scale | seconds |',
                  '|---|---|---|---|---|---|---:|']
        for run in amp['runs']:
            probe = run.get('probe', {})
            scale = (f"{probe['scale_before']:g} -> {probe['scale_after']:g}"
                     if probe.get('scale_after') is not None else '-')
            lines.append(
                f"| `{run['command']}` | {run.get('status')} | "
                f"{run.get('frozen_bit_identical', '-')} | "
                f"{run.get('selected_rows_moved', '-')} | "
                f"{probe.get('status', '-')} | {scale} | "
                f"{run['seconds']:.0f} |")
        for run in amp['runs']:
            for key in ('amp_note', 'amp_skipped'):
                if run.get(key):
                    lines.append(f"\n{run['tool']}: {run[key]}.")
            if run.get('probe', {}).get('reason'):
                lines.append(f"\n{run['tool']} probe: "
                             f"{run['probe']['reason']}.")
            for problem in run.get('problems', []):
                lines.append(f"\n{run['tool']}: **{problem}**")
        d = amp['trainee_skip_check']
        lines.append('\nTrainee (float16, GradScaler, AdamW, APLA): '
                     f"{d['status']}" + (
                         f" ({d['reason']})" if d.get('reason') else
                         f"; loss scale {d['scale_before']:g} -> "
                         f"{d['scale_after']:g}, "
                         f"{d['entries_compared']} entries compared, next "
                         f"step trains: {d['next_step_trains']}"))
    det = result.get('detection')
    if det:
        lines += ['', '## Detection: Mask R-CNN', '']
        if det['status'] == 'skipped':
            lines.append(f"Skipped: {det['reason']}.")
        else:
            lines += [f"{det['model']}, {det['size']}x{det['size']}, batch "
                      f"{det['batch']}.", '',
                      '| method | account MiB | peak MiB | peak / account | '
                      'step ms |', '|---|---:|---:|---:|---:|']
            for r in det['methods']:
                lines.append(
                    f"| {r['label']} | {_mib(r['account']['total'])} | "
                    f"{_mib(r['peak']['bytes'])} | "
                    f"{r['peak_over_account']:.3f} | "
                    f"{_ms(r['train_time'])} |")
    lines.append('')
    return '\n'.join(lines)


def write_report(result: dict, out: str) -> Dict[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out``."""
    import json
    os.makedirs(out, exist_ok=True)
    paths = dict(json=osp.join(out, 'report.json'),
                 md=osp.join(out, 'report.md'))
    with open(paths['json'], 'w') as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths['md'], 'w') as f:
        f.write(markdown(result))
    return paths


__all__ = [
    'ACCOUNT_LEAVES_OUT', 'FULL_PLAN', 'GPUReportOptions', 'MemoryMeter',
    'QUICK_PLAN', 'detection_section', 'kernel_label', 'machine_info',
    'markdown', 'memory_and_time', 'mmcv_ops_on', 'run_gpu_report',
    'sdpa_kernels', 'supported_precisions', 'write_report'
]
