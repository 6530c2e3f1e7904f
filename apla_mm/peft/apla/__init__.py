"""APLA (arXiv 2503.11335): the adapter, its config, layer and selection.

``config.py`` (:class:`APLAConfig`, the rank rule), ``selection.py`` (which
channels), ``layer.py`` (one layer's rows and autograd), ``model.py``
(:class:`APLAAdapter`).
"""
from .config import APLAConfig, Rank, check_rank, layer_rank
from .layer import APLALayer
from .model import APLAAdapter
from .selection import (check_indices, layer_seed, load_index_file,
                        norm_channels, random_channels)

__all__ = [
    'APLAAdapter', 'APLAConfig', 'APLALayer', 'Rank', 'check_indices',
    'check_rank', 'layer_rank', 'layer_seed', 'load_index_file',
    'norm_channels', 'random_channels'
]
