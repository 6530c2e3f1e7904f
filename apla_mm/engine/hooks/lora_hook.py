"""LoRA on the attention projections, as a drop-in hook (the baseline)."""
from typing import Sequence, Union

from mmengine.logging import print_log

from apla_mm.peft.lora import LoRAConfig
from apla_mm.registry import HOOKS
from ..runner_utils import is_training
from .peft_hook import BasePEFTHook


@HOOKS.register_module()
class LoRAHook(BasePEFTHook):
    """Train low-rank updates of the ViT attention projections.

    LoRA (Hu et al., arXiv 2106.09685), the usual PEFT baseline, with the same
    drop-in use, trainable-parameter report, checkpoint meta and delta export
    as :class:`~apla_mm.engine.APLAHook`::

        custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
        custom_hooks = [dict(type='LoRAHook', rank=8, alpha=16,
                             targets=('qkv', 'proj'))]

    Any optimizer wrapper works. The factors take the place (and the
    learning-rate/weight-decay settings) of the weight they adapt in the
    already-built optimizer. Checkpoints hold the frozen weights plus the
    factors; for validation or testing outside training the hook applies
    LoRA, lets the checkpoint load, and merges the factors into the weights
    before the first batch, so inference runs the plain model.
    (``tools/export_delta.py``/``merge_delta.py`` produce a plain checkpoint
    for the base config.)

    Args:
        rank (int): Rank of the updates. Defaults to 8.
        alpha (float): The update is scaled by ``alpha / rank``.
            Defaults to 16.
        targets (str | list[str]): ``'qkv'``, ``'proj'`` (input and output
            attention projections of timm/mmseg/mmpretrain ViTs) or regexes
            full-matched on module names. Defaults to ``('qkv', 'proj')``.
        dropout (float): Dropout on the LoRA input. Defaults to 0.
        frozen_modules (Sequence[str]): Top-level modules frozen apart from
            the factors. Defaults to ``('backbone',)``.
        with_cp (bool): Recompute the adapted transformer blocks in backward
            (:mod:`apla_mm.peft.checkpointing`). Defaults to False.
    """

    method = 'lora'
    frozen_note = 'frozen except LoRA factors'
    apply_for_inference = True

    def __init__(self,
                 rank: int = 8,
                 alpha: float = 16.0,
                 targets: Union[str, Sequence[str]] = ('qkv', 'proj'),
                 dropout: float = 0.0,
                 frozen_modules: Sequence[str] = ('backbone', ),
                 with_cp: bool = False) -> None:
        super().__init__(
            LoRAConfig(rank=rank, alpha=alpha, targets=targets,
                       dropout=dropout, frozen_modules=frozen_modules,
                       with_cp=with_cp))
        self._merged = False

    def summary_title(self) -> str:
        adapter = self.adapter
        return (f'LoRA: {len(adapter.layers)} weights (e.g. '
                f'{adapter.layers[0].name}), rank {self.config.rank}, alpha '
                f'{self.config.alpha}; {adapter.num_trainable():,} trainable '
                'entries in the factors.')

    def _merge_for_inference(self, runner) -> None:
        if self.adapter is None or self._merged or is_training(runner):
            return
        self.adapter.merge_and_unload()
        self._merged = True
        print_log('LoRA: factors merged into the weights for inference.',
                  logger='current')

    def before_test(self, runner) -> None:
        self._merge_for_inference(runner)

    def before_val(self, runner) -> None:
        self._merge_for_inference(runner)
