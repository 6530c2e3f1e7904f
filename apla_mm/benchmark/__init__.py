"""Benchmarks of APLA and the baselines: parameters, memory, time.

``tools/benchmark.py`` is the command line; the pieces are usable alone:

* :mod:`.methods`: method names, task presets, :class:`Trainee` (a method
  built from its config with the PEFT hook's adapter, AdamW, a synthetic
  batch);
* :mod:`.memory`: the exact per-step memory account
  (:func:`account_step`, :class:`SavedTensorRecorder`) and the measured
  peak in a fresh process (:func:`measure_peak`);
* :mod:`.timing`: interleaved (round-robin) step timing;
* :mod:`.runner`: :func:`run_benchmark`;
* :mod:`.report`: markdown, JSON and PNG outputs.
"""
from . import classifier  # noqa: F401  (registers BenchViTClassifier)
from .memory import (SavedTensorRecorder, account_step, breakdown,
                     grad_bytes, measure_peak, optimizer_bytes,
                     weight_bytes)
from .methods import (PRESETS, MethodSpec, Trainee, apply_method,
                      config_methods, method_label, parse_method,
                      preset_methods)
from .report import chart, markdown, write_outputs
from .runner import BenchmarkOptions, run_benchmark
from .timing import interleaved, summarize

__all__ = [
    'BenchmarkOptions', 'MethodSpec', 'PRESETS', 'SavedTensorRecorder',
    'Trainee', 'account_step', 'apply_method', 'breakdown', 'chart',
    'config_methods', 'grad_bytes', 'interleaved', 'markdown',
    'measure_peak', 'method_label', 'optimizer_bytes', 'parse_method',
    'preset_methods', 'run_benchmark', 'summarize', 'weight_bytes',
    'write_outputs'
]
