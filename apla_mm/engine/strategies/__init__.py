"""Training strategies for mmengine's ``FlexibleRunner``, registered in
mmengine's root ``STRATEGIES`` registry."""
from .fsdp import (PlannedWrapPolicy, PortableFSDPStrategy, describe_plan,
                   frozen_apart_wrap_plan, fsdp_units)

__all__ = [
    'PortableFSDPStrategy', 'frozen_apart_wrap_plan', 'PlannedWrapPolicy',
    'describe_plan', 'fsdp_units'
]
