"""META-style adapter: the backbone and the blocks only it uses.

:class:`METAAdapterViT` (``backbone.py``, registered in ``MODELS``) wraps a
frozen :class:`~apla_mm.models.TimmViT` with a spatial prior module
(``spatial_prior.py``) and cascaded MEA injectors and extractors
(``mea.py``) built on cross-shaped attention
(``cross_shaped_attention.py``). See ``docs/meta_adapter.md``.
"""
from .backbone import METAAdapterViT, even_interaction_indexes
from .cross_shaped_attention import (CrossShapedAttention,
                                     cross_shaped_attention)
from .mea import CascadedMEA, MEABlock, concat_linear
from .spatial_prior import SpatialPriorModule

__all__ = [
    'METAAdapterViT', 'even_interaction_indexes', 'CrossShapedAttention',
    'cross_shaped_attention', 'CascadedMEA', 'MEABlock', 'concat_linear',
    'SpatialPriorModule'
]
