"""The stock mixed-precision path, checked: APLA under a loss scaler.

mmseg's and mmdet's ``tools/train.py --amp`` switch the config's
``OptimWrapper`` to mmengine's ``AmpOptimWrapper`` with a dynamic loss
scale: float16 autocast, and a ``GradScaler`` that skips every step whose
gradients hold an inf or a NaN (and halves its scale). APLA keeps W_O in
step with its trainable rows through an optimizer step post-hook, so a
skipped step must change nothing: not the rows, not W_O, not the AdamW
state. This module checks that in two places:

* :class:`AmpProbeHook`, a hook added to a real training run (the stock
  ``tools/train.py --amp`` of mmseg, or ours): at one iteration it poisons one
  gradient entry of a trainable row with ``inf`` (:func:`inject_inf_gradient`)
  and verifies after the iteration that the step was skipped and nothing
  moved; it writes ``amp_probe.json`` to the work directory;
* :func:`skipped_step_check`, the same on a
  :class:`~apla_mm.benchmark.trainee.Trainee` trained with ``amp='fp16'``
  (its ``GradScaler`` steps as ``AmpOptimWrapper`` does:
  ``scaler.step(optimizer); scaler.update()``), which also runs on a CPU
  where torch has a CPU loss scaler (torch >= 2.3).

:func:`stock_run` trains a toy APLA config through a ``tools/train.py`` in a
fresh process with :class:`AmpProbeHook` and
:class:`apla_mm.testing.RankStateDumpHook`, and :func:`check_stock_run`
holds the saved states against APLA's guarantees
(:func:`apla_mm.testing.assert_apla_trained`: frozen entries bit-identical,
every selected row moved).
"""
import contextlib
import json
import os
import os.path as osp
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.hooks import Hook

from apla_mm.registry import HOOKS
from apla_mm.utils.paths import PACKAGE_PARENT

#: The toy APLA config the stock runs train (tiny UperNet + timm ViT, toy
#: segmentation set, 64 x 64).
TOY_APLA_CONFIG = (
    'apla/apla-r16_upernet_timm-vit-tiny_mln_1xb8-600it_toyseg-64x64.py')
PROBE_FILE = 'amp_probe.json'


# ----------------------------------------------------------------------
# pieces shared by the hook and the Trainee check
def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, 'module', model)


def trainable_target(model: nn.Module) -> Tuple[str, nn.Parameter]:
    """The parameter whose gradient the probe poisons: the first trainable
    parameter inside the backbone (an APLA row block), else the first
    trainable parameter.

    Raises:
        ValueError: Nothing in the model trains.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError('the model has no trainable parameter to probe')
    for name, param in named:
        if name.startswith('backbone.'):
            return name, param
    return named[0]


@contextlib.contextmanager
def inject_inf_gradient(param: nn.Parameter) -> Iterator[dict]:
    """While active, the gradient that reaches ``param`` gets ``inf`` in its
    first entry (a tensor hook, before accumulation into ``.grad``).

    Yields:
        dict: ``{'calls': n}``, how many gradients were poisoned.
    """
    state = dict(calls=0)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        state['calls'] += 1
        grad = grad.clone()
        grad.view(-1)[0] = float('inf')
        return grad

    handle = param.register_hook(poison)
    try:
        yield state
    finally:
        handle.remove()


def snapshot(model: nn.Module,
             optimizer: torch.optim.Optimizer) -> Dict[str, torch.Tensor]:
    """Copies of what an optimizer step changes: the state-dict entries
    that are not buffers (plain keys: W_O holds APLA's rows), every
    parameter (the rows themselves), and the optimizer's per-parameter
    state (AdamW's moments and step counters). Buffers are left out: the
    forward pass of a skipped step still updates the heads' BatchNorm
    statistics."""
    buffers = {n for n, _ in model.named_buffers()}
    out = {f'state:{k}': v.detach().clone()
           for k, v in model.state_dict().items() if k not in buffers}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, param in model.named_parameters():
        out[f'param:{name}'] = param.detach().clone()
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f'optim:{names.get(id(param), "?")}:{key}'] = \
                    value.detach().clone()
    return out


def changed_entries(before: Dict[str, torch.Tensor],
                    after: Dict[str, torch.Tensor]) -> List[str]:
    """Keys that differ bitwise (NaNs compare equal to NaNs) or exist on
    one side only."""
    changed = sorted(set(before) ^ set(after))
    for key, old in before.items():
        new = after.get(key)
        if new is None:
            continue
        if old.shape != new.shape or not torch.equal(
                torch.nan_to_num(old), torch.nan_to_num(new)):
            changed.append(key)
    return changed


def _scale(scaler) -> Optional[float]:
    try:
        return float(scaler.get_scale())
    except Exception:  # pragma: no cover - a scaler without a scale
        return None


def judge_skip(before: Dict[str, torch.Tensor],
               after: Dict[str, torch.Tensor], poisoned: int,
               scale_before: Optional[float],
               scale_after: Optional[float]) -> dict:
    """The verdict on one poisoned step: passed when the gradient was
    poisoned, nothing changed and the scaler lowered its scale."""
    changed = changed_entries(before, after)
    lowered = (scale_before is not None and scale_after is not None
               and scale_after < scale_before)
    passed = poisoned > 0 and not changed and lowered
    problems = []
    if poisoned == 0:
        problems.append('the poisoned parameter received no gradient')
    if changed:
        problems.append(f'{len(changed)} entries changed: {changed[:5]}')
    if not lowered:
        problems.append(f'the loss scale did not drop ({scale_before} -> '
                        f'{scale_after})')
    return dict(status='passed' if passed else 'failed',
                poisoned_gradients=poisoned,
                entries_compared=len(before),
                changed=changed[:20],
                scale_before=scale_before,
                scale_after=scale_after,
                problems=problems)


# ----------------------------------------------------------------------
@HOOKS.register_module()
class AmpProbeHook(Hook):
    """Poison one gradient at one iteration and check the skipped step.

    At ``before_train_iter`` of iteration ``iteration`` (0-based, the
    runner's ``iter``) it copies the model and the optimizer state
    (:func:`snapshot`) and poisons the first gradient entry of the first
    trainable backbone parameter (APLA's rows;
    :func:`inject_inf_gradient`); after the iteration it compares. The
    verdict (:func:`judge_skip`) goes to ``{work_dir}/amp_probe.json``.
    With an optimizer wrapper without an enabled loss scaler (plain
    ``OptimWrapper``, bfloat16 on a CPU) nothing is poisoned (an inf would
    reach the weights) and the file says why.

    Args:
        iteration (int): The iteration to poison. Defaults to 1 (not the
            first: a float16 scaler may skip the first steps by itself).
        out_file (str): File name in the work directory.
    """

    priority = 'LOWEST'

    def __init__(self, iteration: int = 1,
                 out_file: str = PROBE_FILE) -> None:
        self.iteration = iteration
        self.out_file = out_file
        self.result: Optional[dict] = None
        self._pending = None

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        if runner.iter != self.iteration:
            return
        wrapper = runner.optim_wrapper
        scaler = getattr(wrapper, 'loss_scaler', None)
        self.result = dict(iteration=self.iteration,
                           wrapper=type(wrapper).__name__,
                           scaler=type(scaler).__name__ if scaler else None)
        if scaler is None or not scaler.is_enabled():
            self.result.update(
                status='not applicable',
                reason=f'{type(wrapper).__name__} has no enabled loss scaler '
                '(no step is ever skipped; an inf gradient would reach the '
                'weights)')
            return
        model = _unwrap(runner.model)
        name, param = trainable_target(model)
        before = snapshot(model, wrapper.optimizer)
        injection = inject_inf_gradient(param)
        calls = injection.__enter__()
        self.result['target'] = name
        self._pending = (injection, calls, before, _scale(scaler))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if self._pending is None:
            return
        injection, calls, before, scale_before = self._pending
        self._pending = None
        injection.__exit__(None, None, None)
        wrapper = runner.optim_wrapper
        after = snapshot(_unwrap(runner.model), wrapper.optimizer)
        self.result.update(
            judge_skip(before, after, calls['calls'], scale_before,
                       _scale(wrapper.loss_scaler)))
        self._write(runner)

    def after_train(self, runner) -> None:
        if self.result is None:
            self.result = dict(
                iteration=self.iteration, status='not reached',
                reason=f'training ended before iteration {self.iteration}')
        self._write(runner)

    def _write(self, runner) -> None:
        with open(osp.join(runner.work_dir, self.out_file), 'w') as f:
            json.dump(self.result, f, indent=1)


# ----------------------------------------------------------------------
def skipped_step_check(device: str, rank: int = 16,
                       size: Optional[int] = None) -> dict:
    """Train the tiny APLA UperNet (``seg``/``tiny`` preset) one float16
    step with a loss scaler, then poison one row gradient and check that
    the next step is skipped without changing anything.

    Args:
        device (str): Where to train.
        rank (int): APLA rank (of the tiny ViT's 64 channels).
        size (int, optional): Input size (default: the preset's 64; a CPU
            emulates float16, so 32 there).

    Returns:
        dict: :func:`judge_skip`'s verdict, or ``status='skipped'`` with the
        reason where this torch has no loss scaler for ``device``.
    """
    from apla_mm.compat import TorchTooOld
    from .presets import preset_methods
    from .trainee import Trainee
    if size is None:
        size = 32 if torch.device(device).type == 'cpu' else 64
    specs, preset = preset_methods('seg', 'tiny', size=size,
                                   methods=[f'apla-r{rank}'], amp='fp16')
    try:
        trainee = Trainee(specs[0], preset['batch'], size, device,
                          amp='fp16')
    except TorchTooOld as e:
        return dict(status='skipped', reason=str(e))
    trainee.train_step()
    model = trainee.model
    name, param = trainable_target(model)
    before = snapshot(model, trainee.optimizer)
    scale_before = _scale(trainee.scaler)
    with inject_inf_gradient(param) as calls:
        trainee.train_step()
    result = judge_skip(before, snapshot(model, trainee.optimizer),
                        calls['calls'], scale_before, _scale(trainee.scaler))
    # and the next, clean step trains again
    trainee.train_step()
    moved = changed_entries(before, snapshot(model, trainee.optimizer))
    result.update(target=name, method=specs[0].name,
                  next_step_trains=any(k == f'param:{name}' for k in moved))
    if not result['next_step_trains']:
        result['status'] = 'failed'
        result['problems'].append('the step after the skipped one did not '
                                  'update the probed rows')
    return result


# ----------------------------------------------------------------------
def stock_train_script(tool: str) -> str:
    """The ``tools/train.py`` of ``'mmseg'`` (mmseg's own, shipped in its
    package under ``.mim/tools``) or ``'apla_mm'`` (this repository's).

    Raises:
        FileNotFoundError: The script is not there.
    """
    if tool == 'mmseg':
        import mmseg
        path = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools',
                        'train.py')
    elif tool == 'apla_mm':
        path = osp.join(PACKAGE_PARENT, 'tools', 'train.py')
    else:
        raise ValueError(f"tool must be 'mmseg' or 'apla_mm', got {tool!r}")
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'{path} does not exist: {tool} is installed without its tools '
            '(mmseg ships them in its wheel under mmseg/.mim/tools).')
    return path


def write_probe_config(path: str, work_dir: str, data_root: str,
                       iters: int, probe_iter: int,
                       config: str = TOY_APLA_CONFIG) -> str:
    """A config file: ``config`` shrunk to ``iters`` iterations on the toy
    data at ``data_root`` (:func:`apla_mm.testing.short_run_cfg`), with
    :class:`AmpProbeHook` at ``probe_iter`` and
    :class:`apla_mm.testing.RankStateDumpHook` added. Its optimizer wrapper
    stays the config's ``OptimWrapper``, as ``--amp`` expects."""
    from apla_mm.testing import short_run_cfg
    cfg = short_run_cfg(config, work_dir, data_root, max_iters=iters,
                        batch_size=4)
    imports = list(cfg.get('custom_imports', {}).get('imports', []))
    for module in ('apla_mm', 'apla_mm.testing', __name__):
        if module not in imports:
            imports.append(module)
    cfg.custom_imports = dict(imports=imports, allow_failed_imports=False)
    cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [
        dict(type='RankStateDumpHook'),
        dict(type='AmpProbeHook', iteration=probe_iter)
    ]
    cfg.dump(path)
    return path


def stock_run(tool: str, config: str, work_dir: str, amp: bool,
              timeout: float = 600) -> dict:
    """Run ``tools/train.py`` of ``tool`` on ``config`` in a fresh process.

    Returns:
        dict: the command, exit code, seconds, the end of its output on
        failure.
    """
    script = stock_train_script(tool)
    cmd = [sys.executable, script, config, '--work-dir', work_dir]
    if amp:
        cmd.append('--amp')
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = PACKAGE_PARENT + os.pathsep + env.get(
        'PYTHONPATH', '')
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=PACKAGE_PARENT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    shown = [osp.relpath(c, PACKAGE_PARENT) if osp.isabs(c) and
             c.startswith(PACKAGE_PARENT) else c for c in cmd[1:]]
    out = dict(tool=tool, command='python ' + ' '.join(shown),
               returncode=proc.returncode, seconds=seconds)
    text = proc.stdout + proc.stderr
    for line in text.splitlines():
        if '--amp: optimizer wrapper is' in line or \
                'AMP training is already enabled' in line:
            out['amp_note'] = line.split(' - ')[-1].strip()
    if proc.returncode != 0:
        out['output_tail'] = (proc.stderr[-2500:] + '\n' +
                              proc.stdout[-1000:])
    return out


def check_stock_run(work_dir: str) -> dict:
    """Hold a finished :func:`stock_run` against APLA's guarantees: the
    saved ``rank0_state.pth`` (:class:`apla_mm.testing.RankStateDumpHook`)
    through :func:`apla_mm.testing.assert_apla_trained` (frozen entries
    bit-identical, every selected row moved) and the probe's verdict.
    """
    from apla_mm.compat import load_weights_only
    from apla_mm.testing import assert_apla_trained
    out: dict = {}
    state_file = osp.join(work_dir, 'rank0_state.pth')
    if not osp.isfile(state_file):
        return dict(status='failed', problems=['no rank0_state.pth: the '
                                               'run did not finish'])
    state = load_weights_only(state_file)
    layers = (state.get('meta') or {}).get('layers') or {}
    indices = {name: m['index'] if m.get('index') is not None else
               list(range(m['out_features'])) for name, m in layers.items()}
    problems = []
    try:
        out['rows_checked'] = assert_apla_trained(state['before'],
                                                  state['after'], indices)
        out['frozen_bit_identical'] = True
        out['selected_rows_moved'] = True
    except AssertionError as e:
        problems.append(f'APLA guarantee broken: {e}')
    backbone = [k for k in state['before'] if k.startswith('backbone.')]
    out['backbone_entries'] = len(backbone)
    out['adapted_layers'] = len(indices)
    out['rows_per_layer'] = sorted({len(v) for v in indices.values()})
    heads_moved = [k for k, v in state['after'].items()
                   if not k.startswith('backbone.') and
                   not torch.equal(state['before'][k], v)]
    out['head_entries_moved'] = len(heads_moved)
    finite = all(torch.isfinite(v).all() for v in state['after'].values()
                 if v.is_floating_point())
    out['finite_weights'] = bool(finite)
    if not finite:
        problems.append('non-finite weights after training')
    probe_file = osp.join(work_dir, PROBE_FILE)
    if osp.isfile(probe_file):
        with open(probe_file) as f:
            out['probe'] = json.load(f)
        if out['probe'].get('status') == 'failed':
            problems.append('the skipped step changed something: ' +
                            '; '.join(out['probe'].get('problems', [])))
    else:
        problems.append('no amp_probe.json')
    out['problems'] = problems
    out['status'] = 'failed' if problems else 'passed'
    return out


def run_amp_section(work_root: str, device: str, iters: int,
                    tools: Sequence[str] = ('mmseg', 'apla_mm'),
                    timeout: float = 600) -> dict:
    """The whole AMP section of the GPU report: toy data, then each tool's
    ``tools/train.py`` (``--amp`` where it applies) with the probe, checked;
    and :func:`skipped_step_check` in this process.

    On a CPU, mmseg's ``--amp`` cannot run (mmengine's ``AmpOptimWrapper``
    asserts an accelerator): mmseg's tool then trains in float32, said in
    the result; ours trains under bfloat16 autocast, which has no loss
    scaler (the probe says "not applicable").
    """
    from apla_mm.toydata.toy import make_toy_segmentation
    cuda = torch.device(device).type == 'cuda'
    data_root = osp.join(work_root, 'toy_seg')
    if not osp.isdir(osp.join(data_root, 'images')):
        make_toy_segmentation(data_root, num_train=16, num_val=2)
    probe_iter = max(1, iters // 2)

    configs = {}
    for tool in tools:  # here: mmengine's config loading is not thread-safe
        work_dir = osp.join(work_root, f'{tool}_train')
        os.makedirs(work_dir, exist_ok=True)
        configs[tool] = write_probe_config(
            osp.join(work_dir, 'probe_config.py'), work_dir, data_root,
            iters, probe_iter)

    def one(tool: str) -> dict:
        work_dir = osp.join(work_root, f'{tool}_train')
        config = configs[tool]
        amp = cuda or tool == 'apla_mm'
        run = stock_run(tool, config, work_dir, amp, timeout=timeout)
        if not amp:
            run['amp_skipped'] = (
                "--amp left out: mmseg's --amp selects mmengine's "
                'AmpOptimWrapper, which asserts a GPU (or NPU/MLU/MUSA); '
                'trained in float32')
        if run['returncode'] == 0:
            run.update(check_stock_run(work_dir))
        else:
            run.update(status='failed',
                       problems=[f"exit code {run['returncode']}"])
        return run

    # the runs are separate processes: side by side, while this process
    # runs its own check
    with ThreadPoolExecutor(max_workers=len(tools)) as pool:
        futures = [pool.submit(one, tool) for tool in tools]
        direct = skipped_step_check(device)
        runs = [f.result() for f in futures]
    return dict(iterations=iters, probe_iteration=probe_iter,
                config=TOY_APLA_CONFIG, runs=runs,
                trainee_skip_check=direct)


__all__ = [
    'AmpProbeHook', 'TOY_APLA_CONFIG', 'changed_entries', 'check_stock_run',
    'inject_inf_gradient', 'judge_skip', 'run_amp_section',
    'skipped_step_check', 'snapshot', 'stock_run', 'stock_train_script',
    'trainable_target', 'write_probe_config'
]
