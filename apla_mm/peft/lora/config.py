"""LoRA's settings (:class:`LoRAConfig`)."""
from dataclasses import dataclass, field
from typing import Tuple

from ..base import PeftConfig
from ..targets import Targets


def lora_scale(alpha: float, rank: int) -> float:
    """The factor of LoRA's update ``alpha / r * B @ A``."""
    return alpha / rank


@dataclass
class LoRAConfig(PeftConfig):
    """LoRA settings.

    Args:
        rank (int): Rank ``r`` of the update. Defaults to 8.
        alpha (float): Scale numerator, the update is ``alpha / r * B @ A``.
            Defaults to 16.
        targets (str | list[str]): Shortcuts ``'qkv'`` and/or ``'proj'``
            (the attention input and output projections of timm, mmseg and
            mmpretrain ViTs) or full-match regexes over module names (see
            :mod:`apla_mm.peft.targets`). Defaults to ``('qkv', 'proj')``.
        dropout (float): Dropout on the LoRA branch's input (module-called
            layers only). Defaults to 0.
        seed (int): Seed of ``A``'s initialisation, drawn per layer from
            ``(seed, layer name)``. Defaults to 0.
        frozen_modules (list[str]): Top-level modules frozen apart from the
            factors. Defaults to ``('backbone',)``.
    """
    rank: int = 8
    alpha: float = 16.0
    targets: Targets = ('qkv', 'proj')
    dropout: float = 0.0
    seed: int = 0
    frozen_modules: Tuple[str, ...] = field(default=('backbone', ))

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) \
                or self.rank <= 0:
            raise ValueError(f'LoRA rank must be a positive integer, got '
                             f'{self.rank!r}')
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f'LoRA alpha must be > 0, got {self.alpha!r}')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f'seed must be an int, got {self.seed!r}')
        if not 0 <= self.dropout < 1:
            raise ValueError(f'dropout must be in [0, 1), got {self.dropout}')
        super().__post_init__()

    @property
    def scale(self) -> float:
        """``alpha / rank``."""
        return lora_scale(self.alpha, self.rank)
