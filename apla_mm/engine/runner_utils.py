"""Helpers for hooks that change the model after the Runner built it."""
import gc
import hashlib
import json
from typing import Any

from mmengine.dist import broadcast_object_list, get_dist_info, is_distributed
from mmengine.optim import BaseOptimWrapper
from torch.nn.parallel import DistributedDataParallel

from apla_mm.compat import release_ddp_autograd_hooks


def is_training(runner) -> bool:
    """Whether ``runner`` is inside ``Runner.train()``.

    ``train()`` builds the optimizer wrapper before calling ``before_run``;
    ``val()``/``test()`` leave it a config dict (or None).
    """
    return isinstance(runner.optim_wrapper, BaseOptimWrapper)


def rewrap_ddp(runner) -> bool:
    """Rebuild the runner's DDP wrapper after parameters were frozen/added.

    The Runner wraps the model in ``DistributedDataParallel`` in its
    ``__init__``, before any hook exists. DDP fixes its set of synchronised
    parameters (and their gradient buckets) at construction, so after a PEFT
    method froze the backbone and created new trainable tensors, the wrapper
    is built again around the same module with the same settings. Frozen
    parameters are then neither bucketed nor all-reduced, the new ones are,
    and no ``find_unused_parameters`` is needed.

    Returns:
        bool: Whether a wrapper was rebuilt.
    """
    old = runner.model
    if not isinstance(old, DistributedDataParallel):
        return False
    kwargs = dict(
        module=old.module,
        device_ids=old.device_ids,
        output_device=old.output_device,
        broadcast_buffers=old.broadcast_buffers,
        process_group=old.process_group,
        bucket_cap_mb=old.bucket_bytes_cap / (1024 * 1024),
        find_unused_parameters=old.find_unused_parameters,
        gradient_as_bucket_view=old.gradient_as_bucket_view,
        static_graph=old.static_graph,
    )
    if hasattr(old, 'detect_anomalous_params'):
        kwargs['detect_anomalous_params'] = old.detect_anomalous_params
    # Detach the old reducer's gradient hooks before the new wrapper adds
    # its own, so that no gradient is reduced twice.
    release_ddp_autograd_hooks(old)
    wrapper_cls = type(old)
    runner.model = None
    del old
    gc.collect()
    runner.model = wrapper_cls(**kwargs)
    return True


def check_same_on_all_ranks(value: Any, what: str) -> None:
    """Raise unless ``value`` (JSON-able) is identical in every process."""
    if not is_distributed():
        return
    digest = hashlib.sha256(
        json.dumps(value, sort_keys=True).encode()).hexdigest()
    reference = [digest]
    broadcast_object_list(reference, src=0)
    if reference[0] != digest:
        rank, _ = get_dist_info()
        raise RuntimeError(
            f'{what} differs between rank 0 and rank {rank}; every process '
            'must build the same model and adapter configuration.')
