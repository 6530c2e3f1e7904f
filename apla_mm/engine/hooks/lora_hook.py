"""LoRA on the attention projections, as a drop-in hook (the baseline)."""
from apla_mm.peft.lora import LoRAConfig
from apla_mm.registry import HOOKS
from .peft_hook import PEFTHook


@HOOKS.register_module()
class LoRAHook(PEFTHook):
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
        **settings: The method's settings, documented once on
            :class:`~apla_mm.peft.LoRAConfig`: ``rank`` (default 8),
            ``alpha`` (16), ``targets`` (``('qkv', 'proj')``), ``dropout``
            (0) and ``frozen_modules`` (``('backbone',)``).
    """

    method = 'lora'

    def __init__(self, **settings) -> None:
        super().__init__(LoRAConfig.from_kwargs('LoRAHook', **settings))
