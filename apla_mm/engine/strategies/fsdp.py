"""mmengine's FSDPStrategy, made to run on CPUs and to keep frozen weights
out of FSDP's gradient memory.

``runner_type='FlexibleRunner'`` with ``strategy=dict(type='FSDPStrategy')``
is mmengine's route to FullyShardedDataParallel. mmengine 0.10.7's strategy
(``mmengine/_strategy/fsdp.py``) assumes CUDA and leaves three things to the
user that apla_mm's runs need:

* **the device.** It wraps with ``device_id=int(LOCAL_RANK)``, a CUDA device
  ("Found no NVIDIA driver" on a CPU machine). :class:`PortableFSDPStrategy`
  passes ``torch.device('cpu')`` there when mmengine's ``get_device()`` is
  the CPU (gloo, as ``tools/dist_train.sh`` runs without GPUs) and the
  process's CUDA device otherwise.
* **plain checkpoints.** mmengine's default ``state_dict_cfg='local'`` writes
  a folder of per-rank shards. The default here is ``'full'``: one file with
  the full, unsharded state dict under the base model's keys, written by
  rank 0, which ``tools/test.py`` and a plain (non-FSDP) config load like any
  other checkpoint. mmengine's ``'full'`` also offloads to CPU memory while
  gathering; on torch 2.13.0 that offload segfaults when the parameters
  already live on the CPU, so it is used on GPUs only.
* **frozen weights apart from trainable ones.** An FSDP unit flattens the
  parameters it owns into one ``FlatParameter``, and with
  ``use_orig_params=True`` the flat parameter gets a gradient as large as
  all of them as soon as one of them trains: frozen weights in a unit with
  trainable ones cost gradient memory (pytorch issues 104967 and 104690
  advise wrapping them apart). With ``frozen_apart=True`` (default) the
  strategy plans the wrapping itself (:func:`frozen_apart_wrap_plan`): every
  unit holds only frozen or only trainable parameters, except a module whose
  *own* parameters mix both (APLA's W_O beside its trainable rows), which
  becomes a unit of its own. Units whose parameters are all frozen have a
  flat parameter without ``requires_grad``: no gradient at all.

A run that is not distributed (``tools/test.py`` on one process, or
``tools/train.py`` without ``--launcher``) runs the model unsharded, as
mmengine's ``SingleDeviceStrategy`` would, so one config serves training
under FSDP and testing on one device.

Example::

    runner_type = 'FlexibleRunner'
    strategy = dict(type='PortableFSDPStrategy',
                    wrap_module_classes=['TransformerEncoderLayer'])

then ``bash tools/dist_train.sh CONFIG 8``. See ``docs/distributed.md``.
"""
import os
from functools import partial
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from mmengine._strategy import FSDPStrategy, SingleDeviceStrategy
from mmengine.device import get_device
from mmengine.dist import is_distributed
from mmengine.model import revert_sync_batchnorm
from torch.distributed.fsdp import FullStateDictConfig
from torch.distributed.fsdp.fully_sharded_data_parallel import \
    FullOptimStateDictConfig

from apla_mm.compat import check_fsdp_device
from apla_mm.registry import STRATEGIES

#: Kinds of unit in a plan (:func:`frozen_apart_wrap_plan`).
FROZEN, TRAINABLE, MIXED = 'frozen', 'trainable', 'mixed'


def _kind(params: Iterable[nn.Parameter]) -> Optional[str]:
    flags = {bool(p.requires_grad) for p in params}
    if not flags:
        return None
    if len(flags) == 2:
        return MIXED
    return TRAINABLE if flags.pop() else FROZEN


def can_be_unit(name: str, module: nn.Module, parent: nn.Module) -> bool:
    """Whether a submodule may become an FSDP unit.

    FSDP (FSDP1) gathers a unit's parameters around the unit's ``forward``
    only, so a unit must be a module its owner *calls*. Not so:

    * ``nn.ModuleList``/``nn.ModuleDict``: containers, never called;
    * the children of ``nn.MultiheadAttention`` (its ``out_proj``), whose
      weights the owner reads directly;
    * OpenMMLab heads, segmentors and detectors (modules with a ``loss``
      method): their owners enter them through ``loss()``/``predict()``.
      Their children (convolutions, linear layers) are called and may be
      units.
    """
    if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return False
    if isinstance(parent, nn.MultiheadAttention):
        return False
    return not callable(getattr(module, 'loss', None))


def frozen_apart_wrap_plan(
        model: nn.Module,
        module_classes: Sequence[str] = (),
        min_num_params: int = int(1e8)) -> Dict[str, str]:
    """Which submodules become FSDP units so that units do not mix frozen
    and trainable parameters where they can be kept apart.

    Among the modules that may be units (:func:`can_be_unit`), bottom-up,
    each module's *free* parameters are its own plus its children's not yet
    in a unit. A module becomes a unit when

    1. its parameters are all frozen or all trainable and those of its
       parent are not (the largest such subtrees; below a module that may
       not be a unit, its children are considered instead), or
    2. its free parameters mix frozen and trainable ones: they cannot be
       split further (APLA's W_O beside its rows, a LoRA-adapted
       ``nn.MultiheadAttention``), so the unit is kept as small as
       possible, or
    3. its free parameters are all frozen or all trainable and its class
       name is in ``module_classes`` (e.g. the transformer block, so that a
       full fine-tuning run gathers one block at a time) or they number at
       least ``min_num_params`` (torch's ``size_based_auto_wrap_policy``
       rule).

    What is left belongs to the root unit, which FSDP always makes.

    Args:
        model (nn.Module): The model before wrapping, its ``requires_grad``
            flags final (adapters applied, frozen modules frozen).
        module_classes (Sequence[str]): Class names wrapped as units (rule
            3).
        min_num_params (int): Size rule of 3. Defaults to ``1e8``.

    Returns:
        Dict[str, str]: Module name -> kind of the unit's parameters
        (``'frozen'``, ``'trainable'`` or ``'mixed'``), inner units first.
    """
    classes = set(module_classes)
    plan: Dict[str, str] = {}

    def visit(name: str, module: nn.Module, parent: Optional[nn.Module],
              split: bool) -> List[nn.Parameter]:
        kind = _kind(module.parameters())
        eligible = parent is not None and can_be_unit(name, module, parent)
        largest = split and kind not in (None, MIXED)
        # children are split apart below a mixed module, and below one
        # that should have been a unit of its own but may not be
        child_split = kind == MIXED or (largest and not eligible)
        free = list(module.parameters(recurse=False))
        for child_name, child in module.named_children():
            full = f'{name}.{child_name}' if name else child_name
            free += visit(full, child, module, child_split)
        free_kind = _kind(free)
        if not eligible or free_kind is None:
            return free
        numel = sum(p.numel() for p in free)
        if largest or free_kind == MIXED or (
                type(module).__name__ in classes
                or numel >= min_num_params):
            plan[name] = free_kind
            return []
        return free

    visit('', model, None, False)
    return plan


class PlannedWrapPolicy:
    """An FSDP ``auto_wrap_policy`` that wraps exactly the modules of a plan.

    FSDP calls it as ``policy(module=..., recurse=..., nonwrapped_numel=...)``
    (``torch/distributed/fsdp/wrap.py``, ``_recursive_wrap``): it recurses
    everywhere and wraps a module when the plan names it.

    Args:
        model (nn.Module): The model the plan was made for.
        plan (Dict[str, str]): From :func:`frozen_apart_wrap_plan`.
    """

    def __init__(self, model: nn.Module, plan: Dict[str, str]) -> None:
        modules = dict(model.named_modules())
        self._ids = {id(modules[name]) for name in plan}

    def __call__(self, module: nn.Module, recurse: bool,
                 nonwrapped_numel: int) -> bool:
        return True if recurse else id(module) in self._ids


def describe_plan(model: nn.Module, plan: Dict[str, str]) -> str:
    """One line: units per kind and the parameters that carry gradients."""
    modules = dict(model.named_modules())
    counts = {FROZEN: 0, TRAINABLE: 0, MIXED: 0}
    frozen_in_mixed = 0
    for name, kind in plan.items():
        counts[kind] += 1
    for name, kind in plan.items():
        if kind != MIXED:
            continue
        for pname, p in modules[name].named_parameters():
            owner = f'{name}.{pname}'.rpartition('.')[0]
            inner = any(owner == u or owner.startswith(u + '.')
                        for u in plan if u.startswith(name + '.'))
            if not p.requires_grad and not inner:
                frozen_in_mixed += p.numel()
    return (f'{len(plan)} FSDP units below the root: {counts[FROZEN]} '
            f'frozen, {counts[TRAINABLE]} trainable, {counts[MIXED]} mixed '
            f'(frozen parameters given gradient memory in mixed units: '
            f'{frozen_in_mixed})')


def check_settable_parameters(model: nn.Module) -> None:
    """Refuse modules whose parameters FSDP cannot replace.

    FSDP1 (``use_orig_params=True``) swaps every parameter for a view into
    its flat parameter with ``setattr(module, name, view)``
    (``torch/distributed/fsdp/_flat_param.py``,
    ``_safe_setattr_tensor_or_param``). A module whose class exposes that
    name as a read-only property fails there with "property ... has no
    setter"; this says so before wrapping. apla_mm's own swaps (APLA's and
    LoRA's layers) define setters (:func:`apla_mm.peft.swap.
    parameter_property`) and pass.

    Raises:
        RuntimeError: Naming the first such module and the way out.
    """
    for name, module in model.named_modules():
        for pname in module._parameters:
            attr = getattr(type(module), pname, None)
            if isinstance(attr, property) and attr.fset is None:
                raise RuntimeError(
                    f'{name}.{pname}: {type(module).__name__} exposes the '
                    'parameter through a read-only property, and FSDP '
                    'replaces parameters with setattr. Give the property a '
                    'setter (see apla_mm.peft.swap.parameter_property), or '
                    'train this model with DDP (tools/dist_train.sh with a '
                    'config without runner_type/strategy). See '
                    'docs/distributed.md.')


@STRATEGIES.register_module()
class PortableFSDPStrategy(FSDPStrategy):
    """:class:`mmengine._strategy.FSDPStrategy` for CPUs and GPUs, with
    plain full checkpoints and frozen weights wrapped apart.

    Keyword Args:
        model_wrapper (dict, optional): As mmengine's, for
            ``MMFullyShardedDataParallel`` (``use_orig_params`` defaults to
            True there; ``mixed_precision``, ``sharding_strategy``, ... pass
            through). ``device_id`` defaults to the CPU or this process's
            GPU. An ``auto_wrap_policy`` given here replaces the strategy's
            own plan.
        state_dict_cfg (str | dict): ``'full'`` (default): one unsharded
            checkpoint with the base model's keys, written by rank 0.
            ``'local'`` or a dict: as mmengine's.
        frozen_apart (bool): Plan the wrapping with
            :func:`frozen_apart_wrap_plan`. Defaults to True.
        wrap_module_classes (Sequence[str]): Class names that become units
            when they do not mix frozen and trainable parameters (e.g.
            ``['TransformerEncoderLayer']`` for mmseg's ViT, ``['Block']`` for
            timm's). Defaults to none.
        min_num_params (int): Size rule of the plan. Defaults to ``1e8``.
        **kwargs: The rest of mmengine's ``FSDPStrategy`` arguments.
    """

    def __init__(self,
                 *,
                 model_wrapper: Optional[dict] = None,
                 state_dict_cfg: Union[str, dict] = 'full',
                 frozen_apart: bool = True,
                 wrap_module_classes: Sequence[str] = (),
                 min_num_params: int = int(1e8),
                 **kwargs) -> None:
        super().__init__(
            model_wrapper=model_wrapper,
            state_dict_cfg=state_dict_cfg,
            **kwargs)
        if isinstance(wrap_module_classes, str):
            wrap_module_classes = [wrap_module_classes]
        self.frozen_apart = frozen_apart
        self.wrap_module_classes = list(wrap_module_classes)
        self.min_num_params = int(min_num_params)
        self.wrap_plan: Dict[str, str] = {}
        self._device = torch.device(get_device())
        if state_dict_cfg == 'full':
            # every rank gets the model's entries (the checkpoint check
            # compares them on every rank), rank 0 the optimizer's; gathered
            # into CPU memory on GPUs only: "offloading" CPU tensors to the
            # CPU segfaults (torch 2.13.0)
            offload = self._device.type == 'cuda'
            self.state_dict_config = FullStateDictConfig(
                offload_to_cpu=offload, rank0_only=False)
            self.optim_state_dict_config = FullOptimStateDictConfig(
                offload_to_cpu=offload, rank0_only=True)

    @property
    def sharded(self) -> bool:
        """Whether the model is wrapped with FSDP (a distributed run)."""
        return is_distributed()

    def _device_id(self) -> torch.device:
        if self._device.type == 'cuda':
            return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        return self._device

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        if not self.sharded:
            self.logger.warning(
                'PortableFSDPStrategy: not a distributed run, the model runs '
                'unsharded on one device.')
            return revert_sync_batchnorm(model).to(self._device)
        check_fsdp_device(self._device)
        check_settable_parameters(model)
        wrapper = dict(self.model_wrapper or
                       dict(type='MMFullyShardedDataParallel'))
        wrapper.setdefault('device_id', self._device_id())
        if self.frozen_apart and wrapper.get('auto_wrap_policy') is None:
            self.wrap_plan = frozen_apart_wrap_plan(
                model, self.wrap_module_classes, self.min_num_params)
            wrapper['auto_wrap_policy'] = PlannedWrapPolicy(
                model, self.wrap_plan)
            self.logger.info('PortableFSDPStrategy: ' +
                             describe_plan(model, self.wrap_plan))
        self.model_wrapper = wrapper
        model = super()._wrap_model(model)
        # FSDP initialises its root on the first forward; a state_dict() of
        # a unit before that (the checkpoint check on --resume) would make
        # that unit a root of its own. Initialise now: the same call the
        # first forward makes (private, same signature on torch 2.1.2 and
        # 2.13.0).
        from torch.distributed.fsdp._runtime_utils import _lazy_init
        _lazy_init(model, model)
        return model

    # One process: a plain model, checkpoints as SingleDeviceStrategy's.
    def save_checkpoint(self, filename: str, **kwargs) -> None:
        if self.sharded:
            return super().save_checkpoint(filename, **kwargs)
        return SingleDeviceStrategy.save_checkpoint(self, filename, **kwargs)

    def load_checkpoint(self, filename: str, **kwargs) -> dict:
        if not self.sharded:
            return SingleDeviceStrategy.load_checkpoint(
                self, filename, **kwargs)
        callback = kwargs.get('callback')
        if callback is not None:
            kwargs['callback'] = partial(self._unsharded_callback, callback)
        return super().load_checkpoint(filename, **kwargs)

    def _unsharded_callback(self, callback: Callable, checkpoint: dict):
        # ``after_load_checkpoint`` hooks (apla_mm's CheckpointCheckHook)
        # compare the checkpoint with ``state_dict()`` of the unwrapped
        # model: the inner units gather their entries themselves (full state
        # dict type), the root's own parameters are gathered here.
        from torch.distributed.fsdp import FullyShardedDataParallel
        with FullyShardedDataParallel.summon_full_params(
                self.model, recurse=False, writeback=False):
            return callback(checkpoint)

    def model_state_dict(self) -> dict:
        if self.sharded:
            return super().model_state_dict()
        return SingleDeviceStrategy.model_state_dict(self)

    def optim_state_dict(self) -> dict:
        """The optimizer's state as FSDP gathers it (full: keyed by the
        plain parameter names), plus what the optimizer wrapper keeps beside
        it (``AmpOptimWrapper``'s ``loss_scaler``)."""
        if not self.sharded:
            return SingleDeviceStrategy.optim_state_dict(self)
        from torch.distributed.fsdp import FullyShardedDataParallel
        state = FullyShardedDataParallel.optim_state_dict(
            self.model, self.optim_wrapper.optimizer)
        state.update(self._wrapper_extras(self.optim_wrapper.state_dict()))
        return state

    def load_model_state_dict(self, state_dict: dict, **kwargs) -> None:
        if self.sharded:
            # FSDP's full-state-dict load asserts that every parameter of a
            # unit is in the file; a plain checkpoint lacks a PEFT method's
            # own tensors, which the adapter derives (APLA's rows from W_O)
            # or starts from (LoRA's initial factors).
            from apla_mm.peft import get_adapter
            adapter = get_adapter(self.model)
            if adapter is not None:
                state_dict = adapter.complete_state_dict(state_dict)
            return super().load_model_state_dict(state_dict, **kwargs)
        return SingleDeviceStrategy.load_model_state_dict(
            self, state_dict, **kwargs)

    def load_optim_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`optim_state_dict` saved. (mmengine 0.10.7
        passes the arguments of ``FSDP.optim_state_dict_to_load`` in an
        order torch 2.1.2 and 2.13.0 do not accept.)"""
        if not self.sharded:
            return SingleDeviceStrategy.load_optim_state_dict(
                self, state_dict)
        from torch.distributed.fsdp import FullyShardedDataParallel
        extras = self._wrapper_extras(state_dict)
        optim_state = {
            k: v
            for k, v in state_dict.items() if k not in extras
        }
        to_load = FullyShardedDataParallel.optim_state_dict_to_load(
            model=self.model,
            optim=self.optim_wrapper.optimizer,
            optim_state_dict=optim_state)
        to_load.update(extras)
        self.optim_wrapper.load_state_dict(to_load)

    @staticmethod
    def _wrapper_extras(state_dict: dict) -> dict:
        return {
            k: v
            for k, v in state_dict.items()
            if k not in ('state', 'param_groups')
        }


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """The FSDP modules of a wrapped model, the root first."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    return [m for m in model.modules()
            if isinstance(m, FullyShardedDataParallel)]


__all__ = [
    'PortableFSDPStrategy', 'frozen_apart_wrap_plan', 'PlannedWrapPolicy',
    'describe_plan', 'fsdp_units', 'check_settable_parameters',
    'can_be_unit'
]
