"""APLA's settings (:class:`APLAConfig`) and its rank rule."""
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from ..base import PeftConfig
from ..targets import Targets

Rank = Union[int, float, str]
SELECTIONS = ('random', 'norm')


def check_rank(rank: Rank) -> Rank:
    """Validate an APLA rank: a positive int, a fraction in ``(0, 1)`` or
    ``'full'``."""
    if isinstance(rank, str):
        if rank != 'full':
            raise ValueError(
                f"APLA rank must be a positive integer, a fraction in (0, 1) "
                f"or 'full', got {rank!r}.")
        return rank
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise TypeError(
                f'A fractional APLA rank must lie in (0, 1) (the share of '
                f"each layer's output channels), got {rank}; use an integer "
                "for a channel count or rank='full' for all of W_O.")
        return rank
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(
            f'APLA rank must be a positive integer (number of output channels'
            f" per layer), a fraction in (0, 1) or 'full', got {rank!r} of "
            f'type {type(rank).__name__}.')
    if rank <= 0:
        raise ValueError(f'APLA rank must be > 0, got {rank}.')
    return rank


def layer_rank(rank: Rank, out_features: int, name: str = 'the layer') -> int:
    """Channels APLA trains in a layer with ``out_features`` outputs.

    * an ``int`` is the same count in every layer; it must not exceed any
      layer's width (Swin's stages are 96...768 channels wide at Swin-T, so
      ``rank=128`` fails on the first stage with an error naming it);
    * a ``float`` in ``(0, 1)`` is the share of each layer's channels,
      ``max(1, round(rank * out_features))`` (``rank=0.125`` trains 12, 24,
      48 and 96 channels in Swin-T's four stages, 96 of 768 in ViT-B);
    * ``'full'`` is every channel.
    """
    if rank == 'full':
        return out_features
    if isinstance(rank, float):
        return max(1, min(out_features, int(round(rank * out_features))))
    if rank > out_features:
        raise ValueError(
            f'APLA rank {rank} exceeds the {out_features} output channels of '
            f'{name}; use rank <= {out_features}, a share of each '
            "layer's channels (a float in (0, 1), e.g. rank=0.25), or "
            "rank='full'.")
    return rank


@dataclass
class APLAConfig(PeftConfig):
    """What APLA adapts and how it picks channels.

    Args:
        rank (int | float | str): Output channels trained per layer (an
            ``int``), the share of each layer's channels (a ``float`` in
            ``(0, 1)``, for backbones whose layers differ in width such as
            Swin), or ``'full'`` for all of W_O (see :func:`layer_rank`).
            Defaults to 64.
        seed (int): Seed of the per-layer random choice. The choice for a
            layer depends only on ``(seed, layer name, out_features, rank)``,
            so every process of a distributed run picks the same channels.
            Defaults to 0.
        targets (str | list[str], optional): Shortcuts or full-match regexes
            over module names (e.g. ``'backbone.vit.blocks.*.attn.proj'``,
            see :mod:`apla_mm.peft.targets`). ``None`` (``'proj'``)
            auto-detects W_O of timm ViTs (DeiT, AugReg, DINOv2, EVA-02,
            SAM, BEiT), mmseg/mmpretrain ViTs and mmseg/mmdet Swin
            (:data:`~apla_mm.peft.targets.ATTN_OUT_PATTERNS`). Targets must
            be linear layers.
        selection (str): ``'random'`` (the paper's choice) or ``'norm'``
            (the rows of largest L2 norm of the initial weights, chosen when
            training starts). Defaults to ``'random'``.
        index_file (str, optional): JSON file ``{layer name: [channels]}``
            giving the channels explicitly (also accepts the APLA repo's
            ``{"block_0": [...], ...}`` files). Overrides ``selection``.
        frozen_modules (list[str]): Top-level modules that are frozen apart
            from the APLA rows. Defaults to ``('backbone',)``.

    Activation checkpointing of the blocks is the memory option
    ``checkpoint_blocks`` (:mod:`apla_mm.memory`), the same for every
    method.
    """
    rank: Rank = 64
    seed: int = 0
    targets: Targets = None
    selection: str = 'random'
    index_file: Optional[str] = None
    frozen_modules: Tuple[str, ...] = field(default=('backbone', ))

    def __post_init__(self) -> None:
        check_rank(self.rank)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f'seed must be an int, got {self.seed!r}')
        if self.selection not in SELECTIONS:
            raise ValueError(f'selection must be one of {SELECTIONS}, got '
                             f'{self.selection!r}')
        super().__post_init__()

    @property
    def full(self) -> bool:
        """Whether every channel of W_O trains (``rank='full'``)."""
        return self.rank == 'full'
