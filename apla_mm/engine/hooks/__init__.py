from .apla_hook import APLAHook

__all__ = ['APLAHook']
