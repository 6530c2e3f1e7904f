"""apla_mm: APLA and memory-efficient ViT adaptation for OpenMMLab.

Importing the package registers its models, hooks and optimizer wrappers
into mmengine's root registries (visible from mmseg- and mmdet-scoped
configs), makes the toy-data generator available as :mod:`apla_mm.toydata`
and lets ``torch.load`` read mmengine checkpoints on
torch >= 2.6 (see :mod:`apla_mm.utils.checkpoint_compat`).
"""
from .utils import register_checkpoint_safe_globals
from .version import __version__

register_checkpoint_safe_globals()

from . import engine, memory, models, peft, toydata  # noqa: E402,F401

__all__ = ['__version__', 'engine', 'memory', 'models', 'peft', 'toydata']
