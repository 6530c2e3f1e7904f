from .amp import PortableAmpOptimWrapper
from .apla_optim_wrapper import APLAAmpOptimWrapper, APLAOptimWrapper

__all__ = [
    'APLAAmpOptimWrapper', 'APLAOptimWrapper', 'PortableAmpOptimWrapper'
]
