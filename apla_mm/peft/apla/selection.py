"""Which output channels APLA trains: seeded random, largest norm, or a file.

The paper (arXiv 2503.11335, Sec. 3) picks ``r`` output channels of every
W_O uniformly at random, once, and keeps them fixed. Here the choice of a
layer depends only on ``(seed, layer name)``, so every process and every
machine picks the same channels without communicating.
"""
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence

import torch

from ..utils import layer_seed
from .config import Rank


def random_channels(out_features: int, rank: int, seed: int,
                    name: str) -> torch.Tensor:
    """``rank`` distinct channels of ``range(out_features)``, sorted."""
    generator = torch.Generator().manual_seed(layer_seed(seed, name))
    perm = torch.randperm(out_features, generator=generator)
    return perm[:rank].sort().values


def norm_channels(weight: torch.Tensor, bias: Optional[torch.Tensor],
                  rank: int) -> torch.Tensor:
    """The ``rank`` rows of largest L2 norm (bias included), sorted."""
    w = weight.detach().float()
    sq = w.pow(2).sum(1)
    if bias is not None:
        sq = sq + bias.detach().float().pow(2)
    # stable: ties keep the lower channel index
    order = torch.sort(-sq, stable=True).indices
    return order[:rank].sort().values.cpu()


def check_indices(indices: Dict[str, Sequence[int]], layers: Sequence,
                  source: str) -> None:
    """Raise a clear error unless ``indices`` fit ``layers`` and their
    ranks (:attr:`~apla_mm.peft.apla.APLALayer.target_rank`)."""
    names = [layer.name for layer in layers]
    missing = [n for n in names if n not in indices]
    extra = [n for n in indices if n not in names]
    if missing or extra:
        raise ValueError(
            f'{source} does not match the adapted layers: '
            + (f'missing {missing[:4]}{"..." if len(missing) > 4 else ""}; '
               if missing else '')
            + (f'unknown {extra[:4]}{"..." if len(extra) > 4 else ""}; '
               if extra else '') + f'expected the layers {names[:3]}...')
    for layer in layers:
        values = indices[layer.name]
        if isinstance(values, torch.Tensor):
            values = values.tolist()
        values = list(values)
        if len(values) != layer.target_rank:
            raise ValueError(
                f'{source}: layer {layer.name} has {len(values)} channels, '
                f'but rank is {layer.target_rank}.')
        if not all(isinstance(v, int) and not isinstance(v, bool)
                   for v in values):
            raise ValueError(f'{source}: layer {layer.name} has non-integer '
                             'channel indices.')
        if len(set(values)) != len(values):
            raise ValueError(f'{source}: layer {layer.name} repeats '
                             'channels.')
        if min(values) < 0 or max(values) >= layer.out_features:
            raise ValueError(
                f'{source}: layer {layer.name} has channels outside '
                f'[0, {layer.out_features}).')


def load_index_file(path: str, layers: Sequence,
                    rank: Rank) -> Dict[str, List[int]]:
    """Read and validate a JSON index file.

    Keys are layer names as in
    :meth:`~apla_mm.peft.apla.APLAAdapter.indices`, or the APLA repository's
    ``block_0, block_1, ...`` matched to the layers in order.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'APLA index file {path!r} does not exist.')
    if rank == 'full':
        raise ValueError("index_file cannot be combined with rank='full'.")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f'APLA index file {path!r} is not valid JSON: '
                         f'{e}') from e
    if not isinstance(data, dict):
        raise ValueError(f'APLA index file {path!r} must hold a JSON object '
                         '{layer name: [channels]}.')
    block_keys = [f'block_{i}' for i in range(len(layers))]
    if sorted(data) == sorted(block_keys):
        data = {layer.name: data[key] for layer, key in zip(layers, block_keys)}
    check_indices(data, layers, f'index file {path!r}')
    return {k: list(v) for k, v in data.items()}
