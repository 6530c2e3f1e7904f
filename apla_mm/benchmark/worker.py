"""Measure one method's peak training memory in a fresh process.

Run by :func:`apla_mm.benchmark.peak.measure_peak`::

    python -m apla_mm.benchmark.worker '{"config": "dumped.py", "name": ...,
        "task": "seg", "size": 256, "batch": 2, "device": "cpu", "steps": 2}'

Prints one line ``APLA_MM_BENCHMARK_RESULT {json}``.
"""
import gc
import json
import sys
import warnings


def main(argv=None) -> None:
    warnings.filterwarnings('ignore')
    spec = json.loads((argv or sys.argv)[1])
    import torch
    from mmengine.config import Config

    import apla_mm  # noqa: F401
    from apla_mm.benchmark.peak import (RESULT_PREFIX, peak_rss_bytes,
                                        reset_peak_rss, rss_bytes)
    from apla_mm.benchmark.specs import MethodSpec
    from apla_mm.benchmark.trainee import Trainee

    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    device = spec['device']
    cuda = device.startswith('cuda')
    # import everything the build needs before the baseline is taken
    if spec['task'] == 'seg':
        import mmseg.models  # noqa: F401
    elif spec['task'] == 'det':
        import mmdet.models  # noqa: F401
    cfg = Config.fromfile(spec['config'])
    method = MethodSpec(spec['name'], spec['name'], spec['task'], cfg)
    steps = max(1, spec.get('steps', 2))

    def build():
        return Trainee(method, spec['batch'], spec['size'], device=device,
                       seed=spec.get('seed', 0), amp=spec.get('amp'),
                       sdpa=spec.get('sdpa') or 'auto')

    # A first, discarded round (build + one step) loads what Python, torch
    # and the libraries allocate once (lazy imports, thread pools, kernel
    # caches, CUDA workspaces); the peak is then reset, so the measurement
    # holds the method's own memory. Without a resettable peak (no
    # /proc/self/clear_refs) the round is skipped.
    warm = spec.get('warm_round', True) and (cuda or reset_peak_rss())
    if warm:
        trainee = build()
        trainee.train_step()
        del trainee
        gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = rss_bytes('VmRSS') or 0
        if warm:
            reset_peak_rss()
    trainee = build()
    built = (torch.cuda.memory_allocated() if cuda else rss_bytes('VmRSS'))
    for _ in range(steps):
        trainee.train_step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kind = 'torch.cuda.max_memory_allocated'
    else:
        peak = peak_rss_bytes()
        kind = 'peak RSS (VmHWM)'
    print(RESULT_PREFIX + json.dumps(
        dict(peak=peak, baseline=baseline, increment=peak - baseline,
             after_build=(built or 0) - baseline, warm_round=bool(warm),
             kind=kind)), flush=True)


if __name__ == '__main__':
    main()
