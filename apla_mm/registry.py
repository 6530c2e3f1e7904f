"""Registries apla_mm registers into.

Every module of ours is registered into mmengine's *root* registries. The
mmseg and mmdet registries are children of these roots, and an unscoped name
is looked up in the current scope first and then in its parents
(``mmengine.registry.Registry.get``), so ``type='APLAHook'``,
``type='TimmViT'`` or ``type='PortableFSDPStrategy'`` resolves the same way
from an mmseg-scoped and from an mmdet-scoped config.
"""
from mmengine.registry import DATASETS, HOOKS, METRICS, MODELS
from mmengine.registry import OPTIM_WRAPPERS, STRATEGIES, TRANSFORMS

__all__ = [
    'DATASETS', 'HOOKS', 'METRICS', 'MODELS', 'OPTIM_WRAPPERS', 'STRATEGIES',
    'TRANSFORMS'
]
