"""The memory account without the arithmetic: models of fake tensors.

A *fake* (abstract) tensor (``torch._subclasses.FakeTensor``) has a shape,
dtype, strides, device and a storage of known size, but no data: every
operation on it runs only the operator's meta function, which computes the
output's metadata (and its aliasing: a view shares its base's storage)
without touching any value. Autograd works on fake tensors as on real ones,
so a forward pass saves the same tensors for backward, ``backward()``
creates ``.grad`` tensors of the same sizes, and AdamW creates the same
state. Counting them (:class:`~apla_mm.benchmark.account.SavedTensorRecorder`
identifies a fake tensor's storage by its ``StorageImpl`` instead of its
data pointer) gives the account of a model far too big, or too slow, to run
here (ViT-L/16, DINOv2-g/14) in seconds and without allocating its weights.

Pieces:

* :func:`fake_parameters`: while a model is *constructed*, every parameter
  and buffer becomes a fake tensor the moment it is registered (the real
  tensor a constructor made, at most one layer's weight, is freed at
  once). Constructors still run on real tensors otherwise, so code such as
  timm's ``[x.item() for x in torch.linspace(0, drop_path_rate, depth)]``
  keeps its values; initialisers (``trunc_normal_``, ...) applied later run
  on the fake tensors, as no-ops.
* :class:`AbstractCompute`: the context of the forward, backward and
  optimizer steps: the :class:`FakeTensorMode` (factory functions such as
  ``torch.zeros`` inside a forward make fake tensors too; real inputs are
  converted) and :class:`DataDependentFallback` on top of it.
* :class:`DataDependentFallback` also corrects the one meta function found
  to differ from the kernels in what it returns: batch norm of a
  float16/bfloat16 input keeps float32 statistics.
* :class:`DataDependentFallback`: a few operators have outputs whose *shape*
  or value depends on the data (boolean-mask indexing, ``nonzero``,
  ``.item()``), which a fake tensor cannot know. The fallback answers them
  with a fixed assumption (every mask element true; ``.item()`` of a bool is
  False, so that ``while mask.any()`` loops and ``if bad.any(): raise``
  checks pass; of a number 1) and records every such answer (operator,
  module) in :attr:`AbstractCompute.substitutions`, which the account
  reports. In the
  segmentation presets the only ones are the pixel accuracy that mmseg's
  decode heads log (computed under the labels' ``!= ignore_index`` mask and
  saving nothing for backward), so the account is unaffected; validated
  against the real account by ``tests/test_benchmark_abstract.py`` and, at
  ViT-B/16 512x512, in ``docs/benchmark.md``. Detection's proposal sampling
  is data dependent throughout, so the abstract account is for
  segmentation and classification models.

The kernel choice that is device dependent, which scaled-dot-product
attention backend runs, is an explicit option
(:mod:`apla_mm.benchmark.sdpa`), since a fake CPU tensor would otherwise
pick the CPU's kernel.
"""
import contextlib
from typing import Iterator, List, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .module_stack import ModuleStack

__all__ = [
    'AbstractCompute', 'DataDependentFallback', 'fake_parameters',
    'is_fake', 'new_fake_mode'
]


def is_fake(t: torch.Tensor) -> bool:
    """Whether ``t`` is a fake tensor (no data)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake
    try:
        return bool(_is_fake(t))
    except Exception:  # pragma: no cover - non-tensor inputs
        return False


def new_fake_mode():
    """A ``FakeTensorMode`` that converts real inputs to fake ones."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def fake_parameters(mode) -> Iterator[None]:
    """Make every parameter and buffer registered inside the block fake.

    Patches ``nn.Module.register_parameter``/``register_buffer`` (which
    ``Module.__setattr__`` calls for ``self.weight = nn.Parameter(...)``),
    so modules built inside keep their structure, names, shapes, dtypes and
    ``requires_grad`` flags, while no weight stays allocated.

    Args:
        mode: The ``FakeTensorMode`` the tensors belong to
            (:func:`new_fake_mode`).

    Yields:
        DataDependentFallback: active during the build (initialisers that
        branch on a fake weight's values get its answers).
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def to_fake(t: torch.Tensor) -> torch.Tensor:
        if is_fake(t):
            return t
        return mode.from_tensor(t.detach())

    def fake_register_parameter(self, name, param):
        if param is not None and not is_fake(param):
            param = nn.Parameter(to_fake(param),
                                 requires_grad=param.requires_grad)
        return register_parameter(self, name, param)

    def fake_register_buffer(self, name, tensor, persistent=True):
        if tensor is not None and not is_fake(tensor):
            tensor = to_fake(tensor)
        return register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter = fake_register_parameter
    nn.Module.register_buffer = fake_register_buffer
    try:
        # initialisers that branch on values (torch's trunc_normal_
        # rejection loop: ``while mask.any()``) get the fallback's answers;
        # the values of a fake model's weights do not exist anyway
        with DataDependentFallback() as fallback:
            yield fallback
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


def check_all_fake(model: nn.Module) -> None:
    """Raise if a parameter or buffer of ``model`` holds real data (a module
    that stored a tensor without registering it, or a fake build that was
    bypassed)."""
    real = [n for n, t in list(model.named_parameters()) +
            list(model.named_buffers()) if not is_fake(t)]
    if real:
        raise RuntimeError(
            f'abstract build: {len(real)} tensors of the model are real '
            f'(e.g. {real[:3]}); they were created outside '
            'register_parameter/register_buffer. Build the model inside '
            'fake_parameters(mode), or run the real account (abstract=False).')


class DataDependentFallback(TorchDispatchMode):
    """Answer data-dependent operators on fake tensors with a fixed
    assumption, and record each answer (see the module docstring).

    Enter it inside the ``FakeTensorMode`` (it is then the first mode an
    operator meets and passes everything else on unchanged).

    Args:
        where (callable, optional): Returns a description of the current
            position (the running module), stored with each substitution.
    """

    def __init__(self, where=None) -> None:
        super().__init__()
        self.where = where
        self.substitutions: List[dict] = []

    def _record(self, func, assumption: str) -> None:
        self.substitutions.append(
            dict(op=str(func.overloadpacket.__name__)
                 if hasattr(func, 'overloadpacket') else str(func),
                 where=self.where() if self.where is not None else '',
                 assumption=assumption))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException, DynamicOutputShapeException)
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
            if func in _BATCH_NORMS:
                out = _float_statistics(args[0], out)
            elif func in _CPU_FLASH_ATTENTION:
                out = _long_sequence_offsets(args[0], out)
            return out
        except DataDependentOutputException:
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                self._record(func, 'item() = False/1')
                if t.dtype == torch.bool:
                    return False
                return 1 if not t.dtype.is_floating_point else 1.0
            if func in (torch.ops.aten.is_nonzero.default, ):
                self._record(func, 'False')
                return False
            raise
        except DynamicOutputShapeException:
            aten = torch.ops.aten
            if func is aten.nonzero.default:
                t = args[0]
                self._record(func, 'every element nonzero')
                return torch.empty((t.numel(), t.dim()), dtype=torch.long,
                                   device=t.device)
            if func in (aten.index.Tensor, aten._unsafe_index.Tensor):
                x, indices = args[0], list(args[1])
                self._record(func, 'boolean mask all true')
                return func(x, _masks_to_indices(indices))
            if func is aten.masked_select.default:
                x, mask = args
                self._record(func, 'boolean mask all true')
                n = torch.broadcast_shapes(x.shape, mask.shape).numel()
                return x.new_empty((n, ))
            raise


_BATCH_NORMS = {
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
    torch.ops.aten._native_batch_norm_legit.no_stats,
}


def _float_statistics(x: torch.Tensor, out):
    """Batch norm of a float16/bfloat16 input: the saved mean and inverse
    std are float32 (the kernels' accumulation type, CPU and CUDA alike),
    while the meta function gives them the input's dtype (torch 2.13)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or \
            not isinstance(out, tuple) or len(out) < 3:
        return out
    fixed = [o.float() if isinstance(o, torch.Tensor) and
             o.dtype == x.dtype and o.dim() == 1 else o for o in out[1:3]]
    return (out[0], *fixed, *out[3:])


_CPU_FLASH_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
}


def _long_sequence_offsets(q: torch.Tensor, out):
    """Flash attention on a CPU: the kernel returns ``cum_seq_q`` and
    ``cum_seq_k`` (outputs 2 and 3, saved for backward) as int64 scalars;
    torch 2.1's meta function gives them int32 (torch 2.13's agrees with
    the kernel, and then nothing changes here)."""
    if q.device.type != 'cpu' or not isinstance(out, tuple) or \
            len(out) < 4:
        return out
    fixed = [o.long() if isinstance(o, torch.Tensor) and
             o.dtype == torch.int32 and o.dim() == 0 else o
             for o in out[2:4]]
    return (*out[:2], *fixed, *out[4:])


def _masks_to_indices(indices: list) -> list:
    """``aten.index`` indices with every boolean mask replaced by the long
    index tensors an all-true mask of its shape selects (a ``k``-dim mask
    covers ``k`` dims: ``k`` flat index tensors of ``numel`` elements)."""
    out = []
    for index in indices:
        if index is None or index.dtype not in (torch.bool, torch.uint8):
            out.append(index)
            continue
        grids = torch.meshgrid(
            *[torch.arange(s, device=index.device) for s in index.shape],
            indexing='ij')
        out.extend(g.reshape(-1) for g in grids)
    return out


class AbstractCompute:
    """The context of a fake model's forward and backward passes.

    ``with compute: ...`` enters the fake mode and the data-dependent
    fallback; :attr:`substitutions` accumulates over every use, each with
    the module that was running.

    Args:
        mode: The model's ``FakeTensorMode``.
        model (nn.Module, optional): Names the running module in the
            substitutions.
    """

    def __init__(self, mode, model: Optional[nn.Module] = None) -> None:
        self.mode = mode
        self._names = ({id(m): n or '(model)'
                        for n, m in model.named_modules()}
                       if model is not None else {})
        self._modules = ModuleStack()
        self.substitutions: List[dict] = []
        self._stack: Optional[contextlib.ExitStack] = None
        self._fallback: Optional[DataDependentFallback] = None

    def _where(self) -> str:
        for module in reversed(self._modules.modules):
            name = self._names.get(id(module))
            if name is not None:
                return name
        return '(outside modules)'

    def __enter__(self) -> 'AbstractCompute':
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._modules)
        self._stack.enter_context(self.mode)
        self._fallback = DataDependentFallback(self._where)
        self._stack.enter_context(self._fallback)
        return self

    def __exit__(self, *exc) -> None:
        stack, fallback = self._stack, self._fallback
        self._stack = self._fallback = None
        stack.close()
        self.substitutions.extend(fallback.substitutions)
