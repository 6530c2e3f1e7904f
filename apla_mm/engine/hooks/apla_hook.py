"""The hook that turns any mmseg/mmdet ViT config into an APLA run."""
import os.path as osp

from mmengine.dist import is_main_process
from mmengine.logging import print_log

from apla_mm.peft.apla import APLAConfig
from apla_mm.registry import HOOKS
from .peft_hook import PEFTHook


@HOOKS.register_module()
class APLAHook(PEFTHook):
    """Train only ``rank`` output channels of every attention W_O.

    APLA (Sorkhei et al., arXiv 2503.11335) adapts a pretrained ViT by
    training a fixed random subset of the output channels of each attention
    output projection; the rest of the backbone stays frozen, while necks and
    heads train as usual. Add to any config with a ViT or Swin backbone::

        custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
        custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]

    (if the base config has its own ``custom_imports``/``custom_hooks``,
    extend them: ``custom_hooks = _base_.custom_hooks + [dict(...)]``). Any
    optimizer wrapper works: ``OptimWrapper``, ``AmpOptimWrapper`` (the
    ``--amp`` flags of mmseg's, mmdet's and our ``tools/train.py``), with
    gradient accumulation and clipping, or a wrapper of your own.

    What it does, in the Runner's order:

    * ``before_run`` (training only): chooses the channels, freezes the
      ``frozen_modules``, creates the trainable rows, moves the already-built
      optimizer onto them and installs the optimizer step post-hook that
      copies the rows into the weights after each step
      (:meth:`APLAAdapter.attach_optimizer`), rebuilds a DDP wrapper and logs
      the trainable-parameter report (see :class:`PEFTHook`).
    * ``after_load_checkpoint`` (``--resume``): checks that the checkpoint
      was trained with the same rank/seed/targets and restores its channels.
    * ``before_train``: checks the pretrained loads, reloads the rows from
      the (now initialised or loaded) weights or, with ``selection='norm'``,
      picks the channels (:meth:`APLAAdapter.on_weights_loaded`); writes
      ``apla_indices.json`` to the work dir, only now that the run's
      settings were accepted (a refused ``--resume`` leaves the file alone).
    * ``before_save_checkpoint``: stores the settings and channels under
      ``meta['apla_mm']``. The state dict itself is the plain model's.

    Validation and testing run the unmodified model: checkpoints hold merged
    weights with the base model's keys, so inference costs nothing extra and
    ``tools/test.py`` works with this config or the base config alike.

    Args:
        save_index_file (bool): Write ``apla_indices.json`` into the work
            dir. Defaults to True.
        **settings: The method's settings, documented once on
            :class:`~apla_mm.peft.APLAConfig`: ``rank`` (default 64),
            ``seed`` (0), ``targets``, ``selection`` (``'random'`` or
            ``'norm'``), ``index_file`` and ``frozen_modules``
            (``('backbone',)``).
    """

    method = 'apla'

    def __init__(self, save_index_file: bool = True, **settings) -> None:
        super().__init__(APLAConfig.from_kwargs('APLAHook', **settings))
        self.save_index_file = save_index_file

    def after_weights_loaded(self, runner) -> None:
        if self.save_index_file and not self.adapter.config.full:
            # Only now: a --resume with other settings was refused before.
            self._write_indices(runner)

    def _write_indices(self, runner) -> None:
        if is_main_process():
            path = osp.join(runner.work_dir, 'apla_indices.json')
            self.adapter.save_index_file(path)
            print_log(f'APLA: channel selection written to {path}',
                      logger='current')
