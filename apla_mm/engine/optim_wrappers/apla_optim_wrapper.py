"""Deprecated names of the optimizer wrappers APLA needed before 0.2.

APLA no longer needs an optimizer wrapper of its own: :class:`APLAHook`
installs an optimizer step post-hook that copies the trained rows into W_O
(:meth:`apla_mm.peft.APLAAdapter.attach_optimizer`), so mmengine's
``OptimWrapper`` and ``AmpOptimWrapper`` (what the ``--amp`` flags of mmseg's,
mmdet's and our ``tools/train.py`` select) or any wrapper of one's own train
APLA. Configs written for the old design, with
``optim_wrapper = dict(type='APLAOptimWrapper')``, keep working: these classes
are the plain wrappers plus a warning that says to remove the line.
"""
import logging

from mmengine.logging import print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from apla_mm.registry import OPTIM_WRAPPERS
from .amp import PortableAmpMixin

_MESSAGE = (
    "optim_wrapper type '{old}' is no longer needed: APLAHook keeps W_O in "
    'step with the trained rows through an optimizer step post-hook, with '
    "any optimizer wrapper. It now behaves as '{new}'; remove the type from "
    "the config (or set type='{new}') so that mmseg's and mmdet's own "
    "'--amp' flag works too.")


class _DeprecatedAPLAWrapperMixin:

    _new_name = 'OptimWrapper'

    def __init__(self, *args, **kwargs) -> None:
        print_log(
            _MESSAGE.format(old=type(self).__name__, new=self._new_name),
            logger='current',
            level=logging.WARNING)
        super().__init__(*args, **kwargs)


@OPTIM_WRAPPERS.register_module()
class APLAOptimWrapper(_DeprecatedAPLAWrapperMixin, OptimWrapper):
    """Deprecated: :class:`mmengine.optim.OptimWrapper` with a warning."""


@OPTIM_WRAPPERS.register_module()
class APLAAmpOptimWrapper(_DeprecatedAPLAWrapperMixin, PortableAmpMixin,
                          AmpOptimWrapper):
    """Deprecated: :class:`~apla_mm.engine.PortableAmpOptimWrapper` (mixed
    precision; bfloat16 on CPUs) with a warning."""

    _new_name = 'AmpOptimWrapper'
