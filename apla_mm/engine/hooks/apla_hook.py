"""The hook that turns any mmseg/mmdet ViT config into an APLA run."""
import os.path as osp
from typing import Optional, Sequence, Union

from mmengine.dist import is_main_process
from mmengine.logging import print_log

from apla_mm.peft.apla import APLAConfig, Rank
from apla_mm.registry import HOOKS
from ..runner_utils import check_same_on_all_ranks
from .peft_hook import BasePEFTHook


@HOOKS.register_module()
class APLAHook(BasePEFTHook):
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
      the trainable-parameter report (see :class:`BasePEFTHook`).
    * ``after_load_checkpoint`` (``--resume``): checks that the checkpoint
      was trained with the same rank/seed/targets and restores its channels.
    * ``before_train``: reloads the rows from the (now initialised or
      loaded) weights; with ``selection='norm'`` picks the channels; writes
      ``apla_indices.json`` to the work dir, only now that the run's
      settings were accepted (a refused ``--resume`` leaves the file alone).
    * ``before_save_checkpoint``: stores the settings and channels under
      ``meta['apla_mm']``. The state dict itself is the plain model's.

    Validation and testing run the unmodified model: checkpoints hold merged
    weights with the base model's keys, so inference costs nothing extra and
    ``tools/test.py`` works with this config or the base config alike.

    Args:
        rank (int | float | str): Output channels trained per layer (an
            ``int``, at most the narrowest layer's width), the share of each
            layer's channels (a ``float`` in ``(0, 1)``: Swin's stages differ
            in width, so ``rank=0.125`` trains 12...96 channels in Swin-T's
            stages), or ``'full'`` for all of W_O. Defaults to 64.
        seed (int): Seed of the per-layer choice. Defaults to 0.
        targets (str | list[str], optional): Full-match regexes over module
            names selecting the projections; ``None`` auto-detects W_O of
            timm ViTs incl. EVA-02/SAM/BEiT (``blocks.N.attn.proj``), mmseg
            (``layers.N.attn.attn.out_proj``) and mmpretrain
            (``layers.N.attn.proj``) ViTs and mmseg/mmdet Swin
            (``stages.N.blocks.M.attn.w_msa.proj``).
        selection (str): ``'random'`` or ``'norm'``. Defaults to
            ``'random'``.
        index_file (str, optional): JSON file with the channels per layer.
        frozen_modules (Sequence[str]): Top-level modules frozen apart from
            the rows. Defaults to ``('backbone',)``.
        save_index_file (bool): Write ``apla_indices.json`` into the work
            dir. Defaults to True.
        with_cp (bool): Recompute the transformer blocks' activations in
            backward (activation checkpointing): the backbone's activation
            memory drops to one tensor per block, at the cost of a second
            forward pass of the backbone. Non-reentrant, so it also covers
            the first blocks of a frozen backbone, which the backbones' own
            reentrant ``with_cp`` skips; setting both is refused (a block
            would be recomputed twice). See
            :mod:`apla_mm.peft.checkpointing`. Defaults to False.
    """

    method = 'apla'
    frozen_note = 'frozen except W_O rows'

    def __init__(self,
                 rank: Rank = 64,
                 seed: int = 0,
                 targets: Union[str, Sequence[str], None] = None,
                 selection: str = 'random',
                 index_file: Optional[str] = None,
                 frozen_modules: Sequence[str] = ('backbone', ),
                 save_index_file: bool = True,
                 with_cp: bool = False) -> None:
        super().__init__(
            APLAConfig(rank=rank, seed=seed, targets=targets,
                       selection=selection, index_file=index_file,
                       frozen_modules=frozen_modules, with_cp=with_cp))
        self.save_index_file = save_index_file

    def before_train(self, runner) -> None:
        adapter = self.adapter
        if adapter is None:
            return
        if adapter.needs_selection and not self._restored:
            adapter.select_from_weights_()
            check_same_on_all_ranks(adapter.indices(),
                                    'The APLA channel selection')
        else:
            # The weights were (re)initialised or loaded after before_run.
            adapter.refresh_()
        if self.save_index_file and not self.config.full:
            # Only now: a --resume with other settings was refused before.
            self._write_indices(runner)

    def summary_title(self) -> str:
        adapter = self.adapter
        layer = adapter.layers[0]
        ranks = sorted({(lay.target_rank, lay.out_features)
                        for lay in adapter.layers})
        if self.config.full:
            rank = 'all'
        elif len(ranks) == 1:
            rank = f'{layer.target_rank} of {layer.out_features}'
        else:
            rank = ', '.join(f'{r} of {o}' for r, o in ranks) + (
                f' (rank={self.config.rank})')
        selection = ('index file' if self.config.index_file else
                     self.config.selection)
        return (f'APLA: {len(adapter.layers)} attention output projections '
                f'(e.g. {layer.name}), {rank} output channels each, '
                f'{selection} selection, seed {self.config.seed}; '
                f'{adapter.num_trainable():,} trainable entries in W_O.')

    def _write_indices(self, runner) -> None:
        if is_main_process():
            path = osp.join(runner.work_dir, 'apla_indices.json')
            self.adapter.save_index_file(path)
            print_log(f'APLA: channel selection written to {path}',
                      logger='current')
