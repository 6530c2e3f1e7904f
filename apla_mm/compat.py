"""Every place where apla_mm depends on which torch it runs on.

apla_mm supports torch 2.1.2 to 2.13.0 (both ends run the whole test suite in
CI; ``setup.py`` states the same range). Each function here hides one API
difference inside that range, says why it exists, and which versions it was
checked on. Nothing here patches torch: each shim calls the API the running
torch has.

Checked on torch 2.1.2 and 2.13.0.
"""
import _compat_pickle
import codecs
import contextlib
import functools
import pickle
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils.hooks import RemovableHandle


def _version(text: str) -> tuple:
    return tuple(int(p) for p in text.split('+')[0].split('.')[:2]
                 if p.isdigit())


#: ``(major, minor)`` of the running torch.
TORCH_VERSION = _version(torch.__version__)


class TorchTooOld(RuntimeError):
    """A feature that needs a newer torch than the one installed."""

    def __init__(self, feature: str, needs: str) -> None:
        super().__init__(
            f'{feature} needs torch >= {needs}; this is torch '
            f'{torch.__version__}. Install a newer torch (apla_mm is tested '
            'up to 2.13.0: `bash tools/install.sh` builds that stack), or '
            'turn the feature off.')


# -- state-dict hooks -------------------------------------------------------
# Public ``register_state_dict_post_hook`` and ``register_load_state_dict_
# pre_hook`` arrived in torch 2.5. Older torch has the same hooks under
# private names (torch 2.1: ``_register_state_dict_hook``, called as
# ``hook(module, state_dict, prefix, local_metadata)``, and
# ``_register_load_state_dict_pre_hook(hook, with_module=True)``, called as
# ``hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
# unexpected_keys, error_msgs)``): the signatures the public ones kept.
def register_state_dict_post_hook(module: nn.Module,
                                  hook: Callable) -> RemovableHandle:
    """Call ``hook(module, state_dict, prefix, local_metadata)`` after
    ``module.state_dict()`` has filled its entries (edit in place)."""
    public = getattr(module, 'register_state_dict_post_hook', None)
    if public is not None:
        return public(hook)
    return module._register_state_dict_hook(hook)


def register_load_state_dict_pre_hook(module: nn.Module,
                                      hook: Callable) -> RemovableHandle:
    """Call ``hook(module, state_dict, prefix, local_metadata, strict,
    missing_keys, unexpected_keys, error_msgs)`` before ``module`` loads its
    entries of a state dict."""
    public = getattr(module, 'register_load_state_dict_pre_hook', None)
    if public is not None:
        return public(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


# -- mixed precision ----------------------------------------------------------
def grad_scaler(device_type: str, enabled: bool = True, **kwargs: Any):
    """A loss scaler for ``device_type``.

    ``torch.amp.GradScaler(device)`` arrived in torch 2.3; before, only
    ``torch.cuda.amp.GradScaler`` existed. A disabled scaler does nothing on
    any device, so the CUDA class serves as the disabled scaler there.

    Raises:
        TorchTooOld: An enabled scaler for a device other than CUDA on
            torch < 2.3.
    """
    amp_scaler = getattr(torch.amp, 'GradScaler', None)
    if amp_scaler is not None:
        return amp_scaler(device_type, enabled=enabled, **kwargs)
    if device_type != 'cuda' and enabled:
        raise TorchTooOld(f'Loss scaling (float16) on {device_type!r}', '2.3')
    return torch.cuda.amp.GradScaler(enabled=enabled, **kwargs)


def cpu_autocast_attention_guard(device_type: str,
                                 dtype: Optional[torch.dtype]):
    """A context for a CPU autocast step's forward *and* backward (where
    checkpointed blocks recompute their forward) that keeps
    ``F.scaled_dot_product_attention`` off torch's CPU flash kernel where
    that kernel's low-precision backward corrupts memory.

    torch 2.1.2's CPU flash-attention backward in bfloat16 aborts the process
    ("double free or corruption") whenever the sequence length is not a
    multiple of its block and batch x heads > 1 (pytorch/pytorch#132871,
    reported on 2.1.2; reproduced here on 2.1.2, not on 2.13.0; 2.2-2.4 not
    checked, hence the bound). The guard is torch's own
    ``torch.backends.cuda.sdp_kernel(enable_flash=False)``, whose flag the
    CPU dispatch also reads there: attention then runs the math kernel
    (more activation memory, same result). On CUDA, in float32 and on
    torch >= 2.5 it does nothing.
    """
    if device_type != 'cpu' or dtype in (None, torch.float32) \
            or TORCH_VERSION >= (2, 5):
        return contextlib.nullcontext()
    return torch.backends.cuda.sdp_kernel(enable_flash=False)


def cpu_flash_attention(query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, dropout_p: float,
                        is_causal: bool, scale: float) -> torch.Tensor:
    """torch's CPU flash-attention kernel, called directly (the
    benchmark's ``flash-cpu`` SDPA choice).

    torch >= 2.2 names it ``aten._scaled_dot_product_flash_attention_for_
    cpu``; torch 2.1 dispatches ``aten._scaled_dot_product_flash_
    attention`` to it for CPU tensors.
    """
    aten = torch.ops.aten
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        return aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_flash_attention(
        query, key, value, dropout_p, is_causal, False, scale=scale)[0]


# -- counting operations ----------------------------------------------------------
#: Whether ``torch.utils.flop_counter.FlopCounterMode`` attributes operations
#: to modules by itself (its ``ModuleTracker``; torch 2.13 has it). torch
#: 2.1 does so only for modules passed to it, through hooks that re-pack a
#: module's inputs and break modules that take a list (mmseg's necks and
#: heads): there the benchmark's ``--flops`` reports totals without the
#: split per part.
FLOPS_PER_MODULE = hasattr(flop_counter, 'ModuleTracker')


# -- loading checkpoints weights-only -------------------------------------------
# torch >= 2.4 lets a program extend the weights-only unpickler's allowlist
# (``torch.serialization.add_safe_globals``); apla_mm adds mmengine's log
# objects there on import (``utils/checkpoint_compat.py``), and torch >= 2.6
# uses that unpickler by default. torch < 2.4 cannot extend it, so
# :func:`load_weights_only` reads with a restricted unpickler of ours
# instead: torch's own allowlist (``torch._weights_only_unpickler.
# _get_allowed_globals``, private, checked on 2.1.2) plus the same mmengine
# entries. torch < 2.6 loads with ``weights_only=False`` by default, so
# mmengine's own loader needs nothing there.
HAS_SAFE_GLOBALS = hasattr(torch.serialization, 'add_safe_globals')


@functools.lru_cache(maxsize=None)
def _restricted_pickle_module() -> SimpleNamespace:
    from torch._weights_only_unpickler import _get_allowed_globals

    from apla_mm.utils.checkpoint_compat import mmengine_safe_globals
    allowed: Dict[str, Any] = dict(_get_allowed_globals())
    for entry in mmengine_safe_globals():
        obj, name = entry if isinstance(entry, tuple) else \
            (entry, f'{entry.__module__}.{entry.__qualname__}')
        allowed[name] = obj
    # dtypes torch 2.1's list lacks (pickled as ``torch.bfloat16``, ...)
    allowed.update({str(t): t for t in (torch.bfloat16, torch.uint8,
                                        torch.bool)})
    allowed['torch.device'] = torch.device
    # protocol 2 stores numpy's raw bytes as ``_codecs.encode(str, enc)``
    # (numpy 1.x arrays); newer torch allows it by default too
    allowed['_codecs.encode'] = codecs.encode

    class RestrictedUnpickler(pickle.Unpickler):
        """Resolves only allow-listed globals (the Python docs' recipe for
        restricting globals)."""

        def find_class(self, module: str, name: str) -> Any:
            # protocol 2 names Python 2 modules (``__builtin__``); the
            # default find_class maps them the same way
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            obj = allowed.get(f'{module}.{name}')
            if obj is None:
                raise pickle.UnpicklingError(
                    f'Unsupported global: GLOBAL {module}.{name} was not an '
                    'allowed global by default')
            return obj

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    return SimpleNamespace(__name__='apla_mm_restricted_pickle',
                           Unpickler=RestrictedUnpickler, load=load)


def load_weights_only(f: Any,
                      map_location: Any = 'cpu',
                      mmap: Optional[bool] = None) -> Any:
    """``torch.load`` that refuses anything but tensors, plain values and
    mmengine's log objects, on every supported torch.

    Raises:
        pickle.UnpicklingError: The file holds another global.
    """
    kwargs = {} if mmap is None else dict(mmap=mmap)
    if HAS_SAFE_GLOBALS:
        return torch.load(f, map_location=map_location, weights_only=True,
                          **kwargs)
    return torch.load(f, map_location=map_location, weights_only=False,
                      pickle_module=_restricted_pickle_module(), **kwargs)


# -- DistributedDataParallel ----------------------------------------------------
def release_ddp_autograd_hooks(ddp_module: nn.Module) -> None:
    """Detach a ``DistributedDataParallel`` wrapper's gradient hooks from
    the parameters it wrapped, so a new wrapper can take them over.

    ``DistributedDataParallel._remove_autograd_hooks`` (private; present
    from torch 2.0, checked on 2.1.2 and 2.13.0) is what DDP itself calls
    when it is re-created; without it the old reducer would keep reducing
    the parameters' gradients a second time.
    """
    remove = getattr(ddp_module, '_remove_autograd_hooks', None)
    if remove is not None:
        remove()


# -- FullyShardedDataParallel on CPUs ---------------------------------------------
def fsdp_runs_on_cpu() -> bool:
    """Whether torch's ``FullyShardedDataParallel`` (FSDP1) can run on CPUs
    (``device_id=torch.device('cpu')``, gloo).

    FSDP's lazy init makes its unshard streams with
    ``device_handle.Stream(priority=...)``; for CPUs the handle is
    ``torch.cpu``, whose ``Stream`` takes no arguments on torch 2.1.2
    (``TypeError: Stream() takes no arguments`` at the first forward), and
    accepts them on torch 2.13.0, where FSDP trains on 2 CPU processes with
    gloo. Decided by that behaviour, not by a version: versions between the
    two were not checked.
    """
    try:
        torch.cpu.Stream(priority=0)
    except TypeError:
        return False
    return True


def check_fsdp_device(device: torch.device) -> None:
    """Raise :class:`TorchTooOld` when FSDP cannot run on ``device``
    (CPUs on torch 2.1.2: :func:`fsdp_runs_on_cpu`)."""
    if torch.device(device).type == 'cpu' and not fsdp_runs_on_cpu():
        raise TorchTooOld(
            'FullyShardedDataParallel on CPUs (gloo; FSDP on GPUs and DDP on '
            'CPUs run on every supported torch)',
            '2.13 (checked; 2.1.2 fails in FSDP\'s CPU stream set-up)')


# -- tensors without values ---------------------------------------------------
def holds_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has data to compare: not a meta tensor and not a
    fake one (``torch._subclasses.fake_tensor``, private on every supported
    torch; the benchmark's abstract account runs on fake tensors). Checked on
    2.1.2 and 2.13.0."""
    if tensor.device.type == 'meta':
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(tensor)


# -- the checkpoint probe of the memory account ------------------------------
#: ``callback(frame, tensor)`` of :func:`checkpoint_region_packs`: ``frame``
#: identifies the checkpointed region (one object per region call),
#: ``tensor`` is what it saves.
RegionPackCallback = Callable[[object, torch.Tensor], None]


@contextlib.contextmanager
def checkpoint_region_packs(callback: RegionPackCallback):
    """Report every tensor a non-reentrant checkpointed region saves.

    Private API: ``torch.utils.checkpoint._checkpoint_hook``, the
    ``saved_tensors_hooks`` subclass that ``checkpoint(...,
    use_reentrant=False)`` installs around a region's forward pass, with
    ``__init__(self, frame)`` setting ``self.pack_hook``. The exact memory
    account (:mod:`apla_mm.benchmark.account`) must know what a region drops
    and recomputes: public hooks around the region see only its inputs, and
    an outer ``saved_tensors_hooks`` is shadowed by the checkpoint's own. The
    class is swapped, for the duration of the context, for a subclass whose
    pack hook reports each tensor before calling the original one, so
    checkpointing itself behaves as before. Checked on torch 2.1.2 and
    2.13.0; on a torch without the class nothing is reported.

    Yields:
        bool: Whether the probe is active.
    """
    import torch.utils.checkpoint as cp
    original = getattr(cp, '_checkpoint_hook', None)
    if original is None:  # pragma: no cover - other torch versions
        yield False
        return

    class _ReportingCheckpointHook(original):

        def __init__(self, frame) -> None:
            super().__init__(frame)
            inner = self.pack_hook

            def pack_hook(x):
                callback(frame, x)
                return inner(x)

            self.pack_hook = pack_hook

    cp._checkpoint_hook = _ReportingCheckpointHook
    try:
        yield True
    finally:
        cp._checkpoint_hook = original


# -- a global choice of the attention kernel ---------------------------------
@contextlib.contextmanager
def routed_sdpa(route: Callable):
    """Replace ``torch.nn.functional.scaled_dot_product_attention`` by
    ``route`` while the context is active (the benchmark's choice of an
    attention kernel, :mod:`apla_mm.benchmark.sdpa`).

    A global touch, on purpose: attention modules look the function up at
    call time (timm's ``Attention``, mmseg's ViT with ``fused_attention``),
    and a ``TorchFunctionMode`` would not do, because the recomputation of
    an activation-checkpointed region runs inside the autograd engine,
    where the mode is not active, and would pick another kernel than the
    forward pass did. ``torch.nn.attention.sdpa_kernel`` (2.3+) cannot pick
    the CPU flash kernel or count a CUDA kernel's saved tensors on fake
    tensors. Checked on torch 2.1.2 and 2.13.0.
    """
    import torch.nn.functional as F
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = route
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
