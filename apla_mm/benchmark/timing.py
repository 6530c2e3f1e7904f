"""Step and inference timing, methods interleaved.

Protocol: every method is built once and kept; then ``warmup + steps``
repetitions run, and in each repetition every method does one call in
turn (round-robin, the order rotated by one method per repetition), so
slow drift of the machine (other jobs, frequency, thermal state) hits all
methods alike. The first ``warmup`` repetitions are discarded; the rest
give the median and the spread (quartiles, min, max). On a GPU every call
is bracketed by ``torch.cuda.synchronize()``; with ``cuda_events`` its
time is taken from CUDA events recorded on the stream around it
(``torch.cuda.Event.elapsed_time``: the GPU's clock, as the GPU report
asks) instead of the host's clock.
"""
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def summarize(samples: Sequence[float]) -> dict:
    """Median, quartiles (IQR), min, max, mean of seconds."""
    xs = sorted(samples)
    if not xs:
        return dict(n=0)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method='inclusive')
    else:
        q1 = q3 = xs[0]
    return dict(n=len(xs), median=statistics.median(xs), q1=q1, q3=q3,
                iqr=q3 - q1, min=xs[0], max=xs[-1],
                mean=statistics.fmean(xs), samples=list(samples))


def interleaved(calls: Dict[str, Callable[[], object]],
                device: torch.device,
                steps: int,
                warmup: int,
                progress: Optional[Callable[[str], None]] = None,
                cuda_events: bool = False) -> Dict[str, dict]:
    """Time ``calls`` round-robin.

    Args:
        calls: name -> zero-argument function (one training step, or one
            inference forward).
        device: Where the calls run (synchronised around each on a GPU).
        steps: Timed repetitions.
        warmup: Discarded repetitions first.
        progress: Called with the method name after each call.
        cuda_events: On a GPU, time each call with CUDA events (start and
            end recorded on the current stream, the end waited for) instead
            of ``time.perf_counter``. Ignored on a CPU.

    Returns:
        dict: name -> :func:`summarize` of the timed calls.
    """
    names = list(calls)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for rep in range(warmup + steps):
        shift = rep % max(len(names), 1)
        order = names[shift:] + names[:shift]
        for name in order:
            _sync(device)
            if cuda_events and device.type == 'cuda':
                start_event = torch.cuda.Event(enable_timing=True)
                end_event = torch.cuda.Event(enable_timing=True)
                start_event.record()
                calls[name]()
                end_event.record()
                end_event.synchronize()
                elapsed = start_event.elapsed_time(end_event) / 1000.0
            else:
                start = time.perf_counter()
                calls[name]()
                _sync(device)
                elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[name].append(elapsed)
            if progress is not None:
                progress(name)
    return {n: summarize(times[n]) for n in names}
