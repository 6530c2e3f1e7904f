from .norm import LN2d

__all__ = ['LN2d']
