from .norm import LN2d

__all__ = ['LN2d']
from .cross_shaped_attention import (CrossShapedAttention,
                                     cross_shaped_attention)
from .mea import CascadedMEA, MEABlock, concat_linear
from .spatial_prior import SpatialPriorModule

__all__ += [
    'CrossShapedAttention', 'cross_shaped_attention', 'CascadedMEA',
    'MEABlock', 'concat_linear', 'SpatialPriorModule'
]
