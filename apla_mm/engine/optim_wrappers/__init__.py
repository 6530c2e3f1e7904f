from .amp import PortableAmpOptimWrapper
from .apla_optim_wrapper import (APLAAmpOptimWrapper, APLAOptimWrapper,
                                 APLAOptimWrapperMixin)

__all__ = [
    'APLAAmpOptimWrapper', 'APLAOptimWrapper', 'APLAOptimWrapperMixin',
    'PortableAmpOptimWrapper'
]
