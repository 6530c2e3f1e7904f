"""Benchmarks of APLA and the baselines: parameters, memory, time.

``tools/benchmark.py`` and ``tools/plan.py`` are the command lines
(:mod:`.cli` holds their common arguments); the pieces are usable alone:

* :mod:`.specs`: method names (``apla-r64+cp+lean``, ...) and
  :class:`MethodSpec`;
* :mod:`.presets`: the task/model presets and their method specs;
* :mod:`.edits`: the config edits a method, an input size or a model width
  makes;
* :mod:`.trainee`: :class:`Trainee` (a method built from its config with the
  PEFT hook's adapter, AdamW, a synthetic batch);
* :mod:`.account`: the exact per-step memory account (:func:`account_step`,
  :class:`SavedTensorRecorder`), with :func:`apla_mm.compat.checkpoint_region_packs` inside
  activation checkpointing;
* :mod:`.peak`: the measured peak in a fresh process (:func:`measure_peak`);
* :mod:`.timing`: interleaved (round-robin) step timing;
* :mod:`.runner`: :func:`run_benchmark`; :mod:`.planner`: what fits in a
  memory budget;
* :mod:`.report`: markdown, JSON and PNG outputs;
* :mod:`.gpu_report` (``tools/gpu_report.py``): a machine checked end to
  end (account vs the allocator's peak, step time, the stock ``--amp`` path
  of :mod:`.amp_check`), docs/gpu.md.
"""
from . import classifier  # noqa: F401  (registers BenchViTClassifier)
from .account import (SavedTensorRecorder, account_step, breakdown,
                      grad_bytes, optimizer_bytes, weight_bytes)
from .edits import apply_method
from .peak import measure_peak
from .presets import PRESETS, config_methods, preset_methods
from .report import chart, markdown, write_outputs
from .runner import BenchmarkOptions, run_benchmark
from .specs import MethodSpec, method_label, parse_method
from .timing import interleaved, summarize
from .trainee import Trainee

__all__ = [
    'BenchmarkOptions', 'MethodSpec', 'PRESETS', 'SavedTensorRecorder',
    'Trainee', 'account_step', 'apply_method', 'breakdown', 'chart',
    'config_methods', 'grad_bytes', 'interleaved', 'markdown',
    'measure_peak', 'method_label', 'optimizer_bytes', 'parse_method',
    'preset_methods', 'run_benchmark', 'summarize', 'weight_bytes',
    'write_outputs'
]
