"""Training memory: the measured peak, in a fresh process per method.

:func:`measure_peak` trains the method for a few steps in a fresh Python
process (``python -m apla_mm.benchmark.worker``). The process first builds
the method and runs one step, discards them and resets its peak (a warm
round: lazy imports, thread pools, kernel caches and CUDA workspaces are
allocated once and are not the method's memory), takes the baseline, then
builds the method again and trains ``steps`` steps. It reports
``torch.cuda.max_memory_allocated`` on a GPU, or the process's peak
resident set size on a CPU (``VmHWM`` of ``/proc/self/status``, reset
through ``/proc/self/clear_refs``; else ``ru_maxrss`` without the warm
round), minus the baseline: the ``increment`` (weights, batch, gradients,
optimizer state, activations, temporaries and allocator slack). On a CPU
the child runs with a fixed glibc mmap threshold
(``MALLOC_MMAP_THRESHOLD_=65536``) so freed tensor buffers leave the
resident set at once.

The exact account, its counterpart, is :mod:`.account`.
"""
import json
import os
import subprocess
import sys
from typing import Optional

from apla_mm.utils.paths import PACKAGE_PARENT


def rss_bytes(field_name: str = 'VmRSS') -> Optional[int]:
    """A ``/proc/self/status`` memory field in bytes (Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field_name + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    value = rss_bytes('VmHWM')
    if value is not None:
        return value
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS
    (``/proc/self/clear_refs``, Linux >= 4.0); False if not possible."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


RESULT_PREFIX = 'APLA_MM_BENCHMARK_RESULT '


def measure_peak(config_file: str, name: str, task: str, size: int,
                 batch: int, device: str, steps: int = 2, seed: int = 0,
                 threads: Optional[int] = None,
                 timeout: Optional[float] = None,
                 amp: Optional[str] = None, sdpa: str = 'auto') -> dict:
    """Train ``steps`` steps of a dumped method config in a fresh process
    and return its peak memory (see the module docstring); ``amp`` and
    ``sdpa`` as for :class:`~apla_mm.benchmark.trainee.Trainee`."""
    spec = dict(config=config_file, name=name, task=task, size=size,
                batch=batch, device=device, steps=steps, seed=seed,
                threads=threads, amp=amp, sdpa=sdpa)
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    # glibc: a fixed mmap threshold returns every freed tensor buffer to the
    # system at once, so the resident size follows the live tensors (the
    # default, adaptive threshold keeps freed buffers of up to 32 MB in the
    # heap and inflates the peak unevenly across methods)
    env.setdefault('MALLOC_MMAP_THRESHOLD_', '65536')
    # the child imports this apla_mm, wherever it is installed
    env['PYTHONPATH'] = PACKAGE_PARENT + os.pathsep + env.get(
        'PYTHONPATH', '')
    proc = subprocess.run(
        [sys.executable, '-m', 'apla_mm.benchmark.worker',
         json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(
        f'peak measurement of {name} failed (exit {proc.returncode}):\n'
        f'{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}')
