"""Which ``nn.Module`` is running: the forward calls in progress.

The memory account attributes each saved tensor, and the abstract account
each data-dependent substitution, to the module that was running; both
follow the calls with :class:`ModuleStack`.
"""
from typing import List, Optional

import torch.nn as nn
from torch.nn.modules.module import (register_module_forward_hook,
                                     register_module_forward_pre_hook)


class ModuleStack:
    """The modules whose ``forward`` is running, outermost first.

    A context manager: while it is active, global module forward hooks (of
    every module, :func:`torch.nn.modules.module.
    register_module_forward_pre_hook`) push each call and pop it when it
    returns (or raises).
    """

    def __init__(self) -> None:
        self.modules: List[nn.Module] = []
        self._handles: list = []

    @property
    def current(self) -> Optional[nn.Module]:
        """The innermost running module (None outside every module)."""
        return self.modules[-1] if self.modules else None

    def _push(self, module: nn.Module, args) -> None:
        self.modules.append(module)

    def _pop(self, module: nn.Module, args, output) -> None:
        if self.modules and self.modules[-1] is module:
            self.modules.pop()

    def __enter__(self) -> 'ModuleStack':
        self._handles = [
            register_module_forward_pre_hook(self._push),
            register_module_forward_hook(self._pop, always_call=True)
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles[::-1]:
            handle.remove()
        self._handles = []
        self.modules = []


__all__ = ['ModuleStack']
