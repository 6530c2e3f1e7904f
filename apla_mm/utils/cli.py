"""Config handling shared by ``tools/train.py`` and ``tools/test.py``.

Both tools accept mmseg and mmdet configs; the config's ``default_scope``
decides which library's conventions apply where the two differ (``--out``,
``--show-dir``).
"""
import logging
import os
import os.path as osp
from typing import Iterable, List, Mapping, Optional, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log

_AMP_WRAPPERS = {
    'OptimWrapper': 'AmpOptimWrapper',
    'APLAOptimWrapper': 'APLAAmpOptimWrapper',
}
_AMP_TYPES = ('AmpOptimWrapper', 'PortableAmpOptimWrapper',
              'APLAAmpOptimWrapper')


#: ``default_scope`` -> task, for the OpenMMLab libraries apla_mm runs.
SCOPE_TASKS = {'mmseg': 'seg', 'mmdet': 'det'}


def task_of(cfg: Config,
            model_tasks: Optional[Mapping[str, str]] = None) -> str:
    """The task of a config: ``'seg'`` or ``'det'`` from its
    ``default_scope``.

    Args:
        cfg (Config): The config.
        model_tasks (Mapping[str, str], optional): Model types that decide
            the task themselves, whatever the scope (the benchmark's
            ``{'BenchViTClassifier': 'backbone'}``).

    Returns:
        str: ``'seg'``, ``'det'``, or the task ``model_tasks`` names.

    Raises:
        ValueError: The scope is neither ``mmseg`` nor ``mmdet``.
    """
    model_type = (cfg.get('model') or {}).get('type')
    if model_tasks and model_type in model_tasks:
        return model_tasks[model_type]
    scope = cfg.get('default_scope')
    if scope in SCOPE_TASKS:
        return SCOPE_TASKS[scope]
    raise ValueError(
        f'Config has default_scope={scope!r}; apla_mm tools run mmseg '
        "('mmseg') and mmdet ('mmdet') configs. Inherit from an mmseg:: or "
        'mmdet:: default_runtime, or set default_scope.')


def default_work_dir(cfg: Config, config_path: str,
                     work_dir: Optional[str]) -> str:
    """CLI ``--work-dir`` > config ``work_dir`` > ``./work_dirs/<name>``."""
    if work_dir is not None:
        return work_dir
    if cfg.get('work_dir') is not None:
        return cfg.work_dir
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def load_config(args) -> Tuple[Config, str]:
    """The config of a ``tools/train.py``/``tools/test.py`` run, as mmseg's
    and mmdet's tools read it: ``--cfg-options`` merged, ``launcher`` and
    ``work_dir`` set (:func:`default_work_dir`), mmdet's dynamo cache limit
    raised for detection. Returns ``(cfg, task)``, task ``'seg'``/``'det'``.
    """
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    task = task_of(cfg)
    if task == 'det':
        from mmdet.utils import setup_cache_size_limit_of_dynamo
        setup_cache_size_limit_of_dynamo()
    cfg.work_dir = default_work_dir(cfg, args.config, args.work_dir)
    return cfg, task


def enable_amp(cfg: Config, has_gpu: bool) -> str:
    """Switch the optimizer wrapper to its mixed-precision variant.

    ``OptimWrapper`` becomes ``AmpOptimWrapper`` (``PortableAmpOptimWrapper``
    on a CPU, with bfloat16), ``APLAOptimWrapper`` becomes
    ``APLAAmpOptimWrapper``.

    Returns:
        str: The wrapper type now in the config.
    """
    wrapper = cfg.optim_wrapper
    current = wrapper.get('type', 'OptimWrapper')
    if current in _AMP_TYPES:
        return current
    if current not in _AMP_WRAPPERS:
        raise ValueError(
            f'--amp supports optim_wrapper types {sorted(_AMP_WRAPPERS)}, got '
            f'{current!r}; set a mixed-precision wrapper in the config '
            'instead.')
    new = _AMP_WRAPPERS[current]
    if new == 'AmpOptimWrapper' and not has_gpu:
        new = 'PortableAmpOptimWrapper'
    wrapper.type = new
    wrapper.setdefault('loss_scale', 'dynamic')
    return new


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """Let ``--launcher pytorch`` run on CPUs: gloo, and DDP without devices.

    mmengine assumes GPUs here: ``init_dist`` calls
    ``torch.cuda.set_device`` and the default DDP wrapper gets
    ``device_ids=[LOCAL_RANK]``. On a machine without GPUs we open the gloo
    process group ourselves (mmengine then skips ``init_dist``) and build
    DDP without device ids.
    """
    if launcher != 'pytorch':
        raise RuntimeError(
            f'--launcher {launcher} without GPUs is not supported (mmengine '
            'binds every process to a GPU); use --launcher pytorch '
            '(tools/dist_train.sh) for multi-process CPU runs.')
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    dist_cfg = env_cfg.setdefault('dist_cfg', ConfigDict())
    dist_cfg['backend'] = 'gloo'
    # SyncBatchNorm only runs on GPUs: each process normalises on its own.
    replaced = _replace_norm(cfg.model, 'SyncBN', 'BN')
    if replaced:
        print_log(
            f'CPU distributed run: {replaced} SyncBN layer configs use BN '
            'instead (SyncBN needs GPUs).', logger='current',
            level=logging.WARNING)
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        type='MMDistributedDataParallel')
    wrapper['device_ids'] = None
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters',
                       cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def _replace_norm(node, old: str, new: str) -> int:
    count = 0
    if isinstance(node, dict):
        if node.get('type') == old and 'type' in node:
            node['type'] = new
            count += 1
        for value in node.values():
            count += _replace_norm(value, old, new)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_norm(value, old, new)
    return count


def _dataset_roots(dataloader_cfg) -> Iterable[str]:
    if not dataloader_cfg:
        return
    dataset = dataloader_cfg.get('dataset', {})
    while isinstance(dataset, dict) and 'dataset' in dataset:
        dataset = dataset['dataset']  # wrappers such as RepeatDataset
    datasets = dataset.get('datasets', [dataset]) if isinstance(
        dataset, dict) else []
    for ds in datasets:
        root = ds.get('data_root')
        if root:
            yield root


def check_data_roots(cfg: Config, loaders: List[str]) -> None:
    """Fail early, with the fix, when a dataset folder does not exist."""
    for loader in loaders:
        for root in _dataset_roots(cfg.get(loader)):
            if osp.isdir(root):
                continue
            hint = ''
            if 'toy' in osp.basename(osp.normpath(root)):
                hint = (' Generate the toy data first: python '
                        'tools/make_toy_data.py --out '
                        f'{osp.dirname(osp.normpath(root)) or "."}')
            raise FileNotFoundError(
                f'{loader}: data_root {root!r} does not exist (relative paths'
                f' are taken from {os.getcwd()}).{hint} Or point the config '
                f'at your data with --cfg-options {loader}.dataset.data_root'
                '=PATH.')


def amp_note(cfg: Config, has_gpu: bool) -> str:
    """What ``--amp`` computes in, for the log (e.g. ``'bfloat16 autocast
    on the CPU'``)."""
    wrapper = cfg.optim_wrapper
    dtype = wrapper.get('dtype')
    if not has_gpu:
        return 'bfloat16 autocast on the CPU (no loss scaling needed)'
    dtype = str(dtype or 'float16').replace('torch.', '')
    scale = wrapper.get('loss_scale', 'dynamic')
    scaling = (f', loss scale {scale}' if dtype == 'float16' else '')
    return f'{dtype} autocast on the GPU{scaling}'


def use_safe_checkpoint_hook(cfg: Config) -> bool:
    """Replace mmengine's ``CheckpointHook`` in ``default_hooks`` with
    :class:`~apla_mm.engine.SafeCheckpointHook` (same arguments; saves that
    survive a kill). Returns whether it was replaced."""
    hooks = cfg.get('default_hooks') or {}
    ckpt = hooks.get('checkpoint')
    if isinstance(ckpt, dict) and ckpt.get('type') in (
            'CheckpointHook', 'mmengine.CheckpointHook'):
        ckpt['type'] = 'SafeCheckpointHook'
        return True
    return False


def _is_local(path: str) -> bool:
    return '://' not in str(path)


def _finished(cfg: Config, meta: dict) -> Optional[Tuple[str, str]]:
    """``(where, option)`` if a checkpoint with ``meta`` ends the
    schedule."""
    train_cfg = cfg.get('train_cfg') or {}
    if 'max_iters' in train_cfg and train_cfg.get('type', '') != \
            'EpochBasedTrainLoop' and meta.get('iter') is not None:
        if int(meta['iter']) >= int(train_cfg['max_iters']):
            return (f'at iteration {meta["iter"]}, train_cfg.max_iters is '
                    f'{train_cfg["max_iters"]}', 'train_cfg.max_iters')
    if 'max_epochs' in train_cfg and meta.get('epoch') is not None:
        if int(meta['epoch']) >= int(train_cfg['max_epochs']):
            return (f'at epoch {meta["epoch"]}, train_cfg.max_epochs is '
                    f'{train_cfg["max_epochs"]}', 'train_cfg.max_epochs')
    return None


def prepare_resume(cfg: Config, resume: Optional[str]) -> Optional[str]:
    """Point the config at the checkpoint a run continues from, verified.

    * ``resume='auto'`` (``--resume`` without a value): the newest
      checkpoint in the work dir that verifies (``last_checkpoint`` or any
      ``iter_N.pth``/``epoch_N.pth``; damaged newer ones are skipped and
      named). Checkpoints present but none intact is an error, so a run
      never restarts from scratch over them; no checkpoint at all starts a
      new run, with a warning.
    * ``resume=PATH``: that file, verified.
    * ``resume=None``: a local ``load_from`` is verified.

    Returns:
        str | None: A message when the checkpoint is already at the end of
        the schedule (nothing to train); None otherwise.

    Raises:
        FileNotFoundError, CheckpointError: As
            :func:`~apla_mm.utils.checkpoint_io.verify_checkpoint_file`.
    """
    from .checkpoint_io import (checkpoint_meta, find_resume_checkpoint,
                                verify_checkpoint_file)
    if resume is None:
        if cfg.get('load_from') and _is_local(cfg.load_from):
            verify_checkpoint_file(cfg.load_from)
        return None
    if resume == 'auto':
        choice = find_resume_checkpoint(cfg.work_dir)
        for path, why in choice.skipped:
            print_log(f'--resume: skipping {path}: {why}', logger='current',
                      level=logging.WARNING)
        if choice.path is None:
            print_log(
                f'--resume: no checkpoint in {cfg.work_dir} (last_checkpoint'
                f' {"names nothing usable" if choice.pointer else "absent"});'
                ' starting a new run.', logger='current',
                level=logging.WARNING)
            cfg.resume = False
            return None
        path = choice.path
    else:
        verify_checkpoint_file(resume)
        path = resume
    cfg.resume = True
    cfg.load_from = path
    finished = _finished(cfg, checkpoint_meta(path))
    if finished is None:
        print_log(f'--resume: continuing from {path} (verified)',
                  logger='current')
        return None
    where, key = finished
    return (f'--resume: {path} is already at the end of training ({where}); '
            f'nothing to do. To train longer, raise {key} (e.g. '
            f'--cfg-options {key}=N) and resume again.')
