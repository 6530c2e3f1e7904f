"""Helpers for tests of apla_mm and of projects built on it.

They turn a repository config into a few-iteration run on the toy data and
record parameters around training, so tests can assert on what changed.
"""
import copy
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, Mapping, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.hooks import Hook

from apla_mm.peft.utils import unwrap_model
from apla_mm.registry import HOOKS
from apla_mm.utils.paths import PACKAGE_PARENT, config_path

#: The repository root (the folder the package is imported from): the
#: working directory of :func:`run_tool`.
REPO_ROOT = PACKAGE_PARENT


def repo_config(path: str) -> str:
    """Absolute path of a shipped config, ``path`` relative to ``configs/``
    (:func:`apla_mm.utils.paths.configs_root`)."""
    return config_path(path)


def run_tool(args: Sequence[str],
             env: Optional[Dict[str, str]] = None,
             timeout: int = 600) -> str:
    """Run a command (e.g. ``['tools/train.py', cfg, ...]`` or
    ``['bash', 'tools/dist_train.sh', ...]``) from the repository root as a
    user would, with this interpreter, and return its stdout + stderr.

    A ``.py`` first argument is run with ``sys.executable``; shell scripts get
    ``PYTHON=sys.executable`` so that their ``python`` is this one, not the
    first on ``PATH``. On failure the error shows the end of stderr (the
    traceback) before the end of stdout (the log).
    """
    args = [str(a) for a in args]
    if args[0].endswith('.py'):
        args = [sys.executable, *args]
    full_env = dict(os.environ, PYTHONWARNINGS='ignore',
                    PYTHON=sys.executable)
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f'{" ".join(args)}\nfailed with exit code {proc.returncode}.\n'
            f'--- stderr (end) ---\n{proc.stderr[-2500:]}\n'
            f'--- stdout (end) ---\n{proc.stdout[-1500:]}')
    return proc.stdout + proc.stderr


def _set_data_root(loader_cfg, data_root: str) -> None:
    dataset = loader_cfg['dataset']
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    dataset['data_root'] = data_root


def short_run_cfg(config: str,
                  work_dir: str,
                  data_root: Optional[str] = None,
                  max_iters: int = 4,
                  val: bool = False,
                  checkpoint_interval: Optional[int] = None,
                  batch_size: Optional[int] = None,
                  **options) -> Config:
    """Load ``config`` and shrink it to a ``max_iters`` training run.

    Args:
        config (str): Config path (absolute, or relative to ``configs/``).
        work_dir (str): Work directory of the run.
        data_root (str, optional): Replaces every dataloader's data root.
        max_iters (int): Training iterations.
        val (bool): Validate at the end of training.
        checkpoint_interval (int, optional): Save every this many iterations
            (default: only at the end).
        batch_size (int, optional): Training batch size.
        **options: Merged with :meth:`Config.merge_from_dict` last.

    Returns:
        Config: Ready for ``Runner.from_cfg``.
    """
    if not osp.isabs(config):
        config = repo_config(config)
    cfg = Config.fromfile(config)
    cfg.work_dir = work_dir
    cfg.launcher = 'none'
    if data_root is not None:
        for loader in ('train_dataloader', 'val_dataloader',
                       'test_dataloader'):
            if cfg.get(loader):
                _set_data_root(cfg[loader], data_root)
    if batch_size is not None:
        cfg.train_dataloader.batch_size = batch_size
    cfg.train_cfg = dict(
        type='IterBasedTrainLoop',
        max_iters=max_iters,
        val_interval=max_iters if val else max_iters + 1)
    if not val:
        cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook',
        by_epoch=False,
        interval=checkpoint_interval or max_iters)
    cfg.default_hooks.logger = dict(
        type='LoggerHook', interval=1, log_metric_by_epoch=False)
    cfg.default_hooks.pop('visualization', None)
    cfg.log_level = 'WARNING'
    cfg.merge_from_dict(options)
    return cfg


class ParamSnapshotHook(Hook):
    """Record every parameter and buffer at ``before_train`` and
    ``after_train`` (after any adapter was applied and the weights were
    loaded), keyed by the plain model's state-dict names.
    """

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.before: Dict[str, torch.Tensor] = {}
        self.after: Dict[str, torch.Tensor] = {}

    @staticmethod
    def _snapshot(runner) -> Dict[str, torch.Tensor]:
        model = unwrap_model(runner.model)
        return {
            k: v.detach().clone()
            for k, v in model.state_dict().items()
        }

    def before_train(self, runner) -> None:
        self.before = self._snapshot(runner)

    def after_train(self, runner) -> None:
        self.after = self._snapshot(runner)

    def changed(self) -> Dict[str, bool]:
        """Whether each entry differs bitwise between the two snapshots."""
        return {
            k: not torch.equal(v, self.after[k])
            for k, v in self.before.items()
        }


def assert_apla_trained(before: Mapping[str, torch.Tensor],
                        after: Mapping[str, torch.Tensor],
                        indices: Mapping[str, Sequence[int]],
                        prefix: str = 'backbone.',
                        rows_moved: bool = True) -> int:
    """Assert that APLA changed nothing in the backbone but the selected
    rows of the adapted layers.

    Every state-dict entry whose key starts with ``prefix`` must be
    bit-identical in ``before`` and ``after``, except the ``weight`` and
    ``bias`` of the adapted layers: there the unselected output rows must be
    bit-identical and, with ``rows_moved``, every selected row must differ in
    at least one entry.

    Args:
        before (Mapping[str, torch.Tensor]): State dict (plain keys) at the
            start, e.g. :attr:`ParamSnapshotHook.before`.
        after (Mapping[str, torch.Tensor]): State dict at the end.
        indices (Mapping[str, Sequence[int]]): Selected output channels per
            adapted layer (module name), as
            :meth:`~apla_mm.peft.APLAAdapter.indices` returns them.
        prefix (str): Only entries under it are checked (necks and heads
            train as usual). Defaults to ``'backbone.'``.
        rows_moved (bool): Also require every selected row to have moved;
            ``False`` checks only that nothing else did (e.g. across a
            resume). Defaults to True.

    Returns:
        int: How many weights and biases were checked row by row.
    """
    assert indices, 'no adapted layers'
    for name in indices:
        assert f'{name}.weight' in before, f'{name}.weight not in the state'
    row_checked = 0
    for key, old in before.items():
        if not key.startswith(prefix):
            continue
        assert key in after, f'{key} missing after training'
        new = after[key]
        layer, _, leaf = key.rpartition('.')
        if layer not in indices or leaf not in ('weight', 'bias'):
            assert torch.equal(old, new), f'frozen {key} moved'
            continue
        rows = torch.zeros(old.shape[0], dtype=torch.bool)
        rows[torch.as_tensor(list(indices[layer]), dtype=torch.long)] = True
        assert torch.equal(old[~rows], new[~rows]), \
            f'an unselected row of {key} moved'
        if rows_moved:
            changed = (old[rows] != new[rows]).reshape(int(rows.sum()), -1)
            assert changed.any(1).all(), \
                f'a selected row of {key} did not move'
        row_checked += 1
    return row_checked


def saved_and_copied(model: torch.nn.Module) -> list:
    """``[torch.load(torch.save(model)), copy.deepcopy(model)]``: the two
    ways a whole model is duplicated (saving the module object; mmengine's
    EMA hook), for tests that the duplicates work like the original."""
    import io
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return [torch.load(buffer, weights_only=False), copy.deepcopy(model)]


def build_runner(cfg: Config, *hooks: Hook):
    """``Runner.from_cfg`` on a copy of ``cfg``, with extra hook objects."""
    from mmengine.runner import Runner
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    for hook in hooks:
        runner.register_hook(hook)
    return runner


@HOOKS.register_module()
class RankStateDumpHook(Hook):
    """Save each process's model state at the start and end of training.

    Writes ``{work_dir}/rank{R}_state.pth`` holding ``before`` and ``after``
    state dicts (plain keys), the names of the entries that are parameters
    (not buffers), the PEFT adapter's ``meta`` if any, and the names of the
    parameters the DDP wrapper synchronises. Used to check
    multi-process runs (same weights and selections on every rank); add it
    with ``custom_imports=['apla_mm.testing']``.
    """

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.before: Dict[str, torch.Tensor] = {}

    def before_train(self, runner) -> None:
        self.before = ParamSnapshotHook._snapshot(runner)

    def after_train(self, runner) -> None:
        from mmengine.dist import get_rank
        from torch.nn.parallel import DistributedDataParallel
        meta = None
        from apla_mm.engine.hooks.peft_hook import PEFTHook
        for hook in runner.hooks:
            if isinstance(hook, PEFTHook) and hook.adapter is not None:
                meta = hook.adapter.meta()
        synced = None
        if isinstance(runner.model, DistributedDataParallel):
            module = runner.model.module
            ignored = getattr(runner.model, 'parameters_to_ignore', set())
            synced = sorted(
                n for n, p in module.named_parameters()
                if p.requires_grad and n not in ignored)
        params = {n for n, _ in unwrap_model(runner.model).named_parameters()}
        torch.save(
            dict(
                param_names=sorted(k for k in self.before if k in params),
                before=self.before,
                after=ParamSnapshotHook._snapshot(runner),
                meta=meta,
                ddp_synced=synced,
                ddp_wrapper=type(runner.model).__name__),
            osp.join(runner.work_dir, f'rank{get_rank()}_state.pth'))
