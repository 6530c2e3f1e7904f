"""A method built and trained outside a Runner, as training would build it.

:class:`Trainee` builds a :class:`~.specs.MethodSpec`'s config exactly as a
Runner would: the config's ``custom_imports``, ``MODELS.build(cfg.model)``
in the config's default scope (a ``PEFTModel`` config builds the adapter
with the model), the PEFT hook's ``build_adapter(model)``, the
``MemoryEfficientHook``'s options (:func:`apply_memory_hook`), an AdamW
over the parameters that require gradients, connected to the adapter as the
PEFT hook connects it (``adapter.attach_optimizer``, then
``adapter.on_weights_loaded()``); then it trains, infers
(``adapter.merge_for_inference()``, as the hook before validation) and
reports parameters and the delta file. It calls exactly the adapter methods
the hooks call; what a method does is the adapter's business.
"""
import contextlib
import copy
import io
from typing import List, Optional

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.utils import import_modules_from_strings

from apla_mm.compat import cpu_autocast_attention_guard, grad_scaler
from apla_mm.engine.hooks.peft_hook import PEFTHook
from apla_mm.memory import MemoryConfig, apply_memory_options
from apla_mm.peft.base import META_KEY, BaseAdapter, get_adapter
from .specs import AMP_DTYPES, MethodSpec, check_amp


def _import_custom(cfg: Config) -> None:
    """Import the config's ``custom_imports`` (as the Runner does)."""
    custom = cfg.get('custom_imports')
    if custom:
        import_modules_from_strings(**custom)


def _revert_sync_bn(model: nn.Module) -> nn.Module:
    from mmengine.model import revert_sync_batchnorm
    return revert_sync_batchnorm(model)


def _scope(cfg: Config):
    from mmengine.registry import DefaultScope
    return DefaultScope.overwrite_default_scope(cfg.get('default_scope'))


def apply_memory_hook(model: nn.Module, hook_cfg: dict,
                      adapter: Optional[BaseAdapter] = None):
    """Apply a ``MemoryEfficientHook`` config entry to a built model as the
    hook would (:func:`apla_mm.memory.apply_memory_options`; the frozen
    weights are cast after the PEFT adapter took its trainable copies).

    Args:
        model (nn.Module): The built model.
        hook_cfg (dict): The ``MemoryEfficientHook`` entry.
        adapter (BaseAdapter, optional): The model's PEFT adapter: it takes
            the weights over (:meth:`BaseAdapter.on_weights_loaded`, as the
            PEFT hook's ``before_train``) before the frozen weights are
            cast.

    Returns:
        The handle of the applied options.
    """
    kwargs = {k: v for k, v in hook_cfg.items() if k != 'type'}
    config = MemoryConfig(**kwargs)
    handle = apply_memory_options(model, config)
    if adapter is not None:
        adapter.on_weights_loaded()
    if config.frozen_dtype is not None:
        handle.cast_frozen_(config.frozen_dtype)
    return handle


class Trainee:
    """One method, built and ready to train (outside a Runner).

    Args:
        spec (MethodSpec): The method.
        batch_size (int): Images per step.
        size (int): Input height and width.
        device (str): ``'cpu'`` or ``'cuda'``.
        seed (int): Seed of the model initialisation and of every step.
        lr (float): AdamW learning rate (the value does not change memory
            or time). Defaults to 1e-4.
        amp (str, optional): ``'bf16'`` or ``'fp16'``: the forward pass and
            the loss run under ``torch.autocast`` of the device (fp16 with a
            ``GradScaler`` in :meth:`train_step`); weights, gradients and
            AdamW state stay float32 (mixed precision, as mmengine's
            ``AmpOptimWrapper``). Defaults to float32.
        abstract (bool): Build the model of fake tensors and run every step
            on them (:mod:`apla_mm.benchmark.abstract`): the memory account
            without allocating weights or computing anything. Defaults to
            False.
        sdpa (str): Scaled-dot-product attention kernel
            (:mod:`apla_mm.benchmark.sdpa`). Defaults to ``'auto'``.
    """

    def __init__(self, spec: MethodSpec, batch_size: int, size: int,
                 device: str = 'cpu', seed: int = 0,
                 lr: float = 1e-4, amp: Optional[str] = None,
                 abstract: bool = False, sdpa: str = 'auto') -> None:
        from mmengine.registry import HOOKS, MODELS

        from .abstract import (AbstractCompute, check_all_fake,
                               fake_parameters, new_fake_mode)
        from .data import make_batch
        from .sdpa import check_backend
        check_amp(amp)
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.amp = amp
        self.abstract = abstract
        self.sdpa = check_backend(sdpa, device, abstract)
        if abstract and spec.task == 'det':
            raise ValueError(
                'the abstract account covers seg and backbone models: a '
                "detector's batch padding and proposal sampling depend on "
                'the data. Run the real account (drop --abstract).')
        if abstract and self.device.type != 'cpu':
            raise ValueError(
                'the abstract account runs on fake CPU tensors; use '
                "device='cpu' (the CUDA attention kernels are counted with "
                "sdpa='flash'/'efficient'/'cudnn').")
        self.fake_mode = new_fake_mode() if abstract else None
        building = (fake_parameters(self.fake_mode) if abstract else
                    contextlib.nullcontext())
        cfg = spec.cfg
        _import_custom(cfg)
        self.memory_handle = None
        with _scope(cfg), building:
            torch.manual_seed(seed)
            model = MODELS.build(copy.deepcopy(cfg.model))
            model = _revert_sync_bn(model)
            self.adapter: Optional[BaseAdapter] = get_adapter(model)
            memory_cfg = None
            for hook_cfg in cfg.get('custom_hooks') or []:
                if hook_cfg.get('type') == 'MemoryEfficientHook':
                    memory_cfg = hook_cfg
                    continue
                hook = HOOKS.build(copy.deepcopy(hook_cfg))
                if isinstance(hook, PEFTHook) and hook.method:
                    if self.adapter is not None:
                        raise ValueError(f'{spec.name}: two PEFT adapters')
                    self.adapter = hook.build_adapter(model)
            if memory_cfg is not None:
                self.memory_handle = apply_memory_hook(model, memory_cfg,
                                                       self.adapter)
            elif self.adapter is not None:
                self.adapter.on_weights_loaded()
        if abstract:
            check_all_fake(model)
        else:
            model = model.to(self.device)
        self.model = model
        self.model.train()
        self.compute_context = (AbstractCompute(self.fake_mode, model)
                                if abstract else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        if self.adapter is not None:
            self.adapter.attach_optimizer(self.optimizer)
        self.scaler = None
        if amp == 'fp16' and not abstract:
            self.scaler = grad_scaler(self.device.type)
        with _scope(cfg), self.compute():
            self.inputs, self.data_samples = make_batch(
                spec.task, model, cfg, size, batch_size, seed)
        self.merged = False

    @property
    def substitutions(self) -> List[dict]:
        """Data-dependent operators the abstract run answered by assumption
        (:class:`~apla_mm.benchmark.abstract.DataDependentFallback`)."""
        if self.compute_context is None:
            return []
        return self.compute_context.substitutions

    @contextlib.contextmanager
    def compute(self):
        """The context of the forward/backward passes: the fake mode (with
        ``abstract``) and the attention kernel choice."""
        from .sdpa import SDPABackend
        with contextlib.ExitStack() as stack:
            if self.compute_context is not None:
                stack.enter_context(self.compute_context)
            stack.enter_context(SDPABackend(self.sdpa))
            yield

    def autocast(self):
        """``torch.autocast`` of the AMP dtype (a no-op in float32)."""
        if self.amp is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(
            torch.autocast(self.device.type, dtype=self._amp_dtype))
        stack.enter_context(self._attention_guard())
        return stack

    @property
    def _amp_dtype(self) -> Optional[torch.dtype]:
        return getattr(torch, AMP_DTYPES[self.amp]) if self.amp else None

    def _attention_guard(self):
        """Forward and backward (which may recompute checkpointed blocks)
        keep attention off kernels this torch cannot differentiate in low
        precision on a CPU (:func:`~apla_mm.compat.
        cpu_autocast_attention_guard`)."""
        return cpu_autocast_attention_guard(self.device.type,
                                            self._amp_dtype)

    # -- one training step, in pieces (the memory account hooks in) -----
    def forward_loss(self) -> torch.Tensor:
        """Forward and loss (under autocast with ``amp``); call inside
        :meth:`compute`."""
        torch.manual_seed(self.seed)
        with _scope(self.spec.cfg), self.autocast():
            losses = self.model(self.inputs, self.data_samples, mode='loss')
            loss, _ = self.model.parse_losses(losses)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` (scaled with fp16); inside :meth:`compute`.
        """
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        with self._attention_guard():
            loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """AdamW step (APLA's rows sync in its step post-hook). With ``abstract`` outside the fake
        mode: AdamW's state follows its fake parameters, while its step
        counters stay real host scalars."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def train_step(self) -> float:
        """zero_grad, forward, backward, AdamW step."""
        self.zero_grad()
        with self.compute():
            loss = self.forward_loss()
            self.backward(loss)
        self.optimizer_step()
        if self.abstract:
            return float('nan')
        return float(loss.detach())

    # -- inference --------------------------------------------------------
    def prepare_inference(self) -> None:
        """Eval mode, and the deployed form the PEFT hook validates and
        tests (:meth:`BaseAdapter.merge_for_inference`: LoRA's factors
        merged into the weights; APLA's weights already hold the rows)."""
        self.zero_grad()
        self.model.eval()
        if self.adapter is not None and not self.merged and \
                self.adapter.merges_for_inference:
            self.adapter.merge_for_inference()
            self.merged = True

    @torch.no_grad()
    def infer(self):
        with _scope(self.spec.cfg), self.compute(), self.autocast():
            return self.model(self.inputs, self.data_samples, mode='tensor')

    # -- parameters ---------------------------------------------------------
    def parameter_report(self) -> dict:
        """Total/trainable parameters and the size of the delta file."""
        from apla_mm.peft.report import count_parameters
        shadow = (self.adapter.shadow_parameters()
                  if self.adapter is not None else ())
        parts = count_parameters(self.model, shadow=shadow)
        total = parts['all']['total']
        trainable = parts['all']['trainable']
        if self.abstract:  # fake tensors cannot be serialised
            return dict(
                total=total,
                trainable=trainable,
                trainable_pct=100.0 * trainable / max(total, 1),
                parts={k: v for k, v in parts.items() if k != 'all'},
                delta_tensors=None, delta_tensor_bytes=None,
                delta_file_bytes=None)
        delta = self.delta_state_dict()
        buf = io.BytesIO()
        torch.save(delta, buf)
        return dict(
            total=total,
            trainable=trainable,
            trainable_pct=100.0 * trainable / max(total, 1),
            parts={k: v for k, v in parts.items() if k != 'all'},
            delta_tensors=len(delta['state_dict']),
            delta_tensor_bytes=sum(
                v.numel() * v.element_size()
                for v in delta['state_dict'].values()),
            delta_file_bytes=buf.getbuffer().nbytes)

    def _state_dict(self) -> dict:
        return {
            k: v.detach().cpu()
            for k, v in self.model.state_dict().items()
        }

    def delta_state_dict(self) -> dict:
        """What a delta file of this run holds.

        APLA and LoRA: :func:`apla_mm.peft.delta.export_delta` of a
        checkpoint of the model (rows / factors + every entry outside the
        frozen modules). Other methods: the trainable parameters and the
        buffers of modules with trainable parameters (the whole model for
        full fine-tuning).
        """
        if self.adapter is not None and not self.merged:
            from apla_mm.peft.delta import export_delta
            return export_delta(
                dict(meta={META_KEY: self.adapter.meta()},
                     state_dict=self._state_dict()))
        state = self._state_dict()
        trainable = {
            n for n, p in self.model.named_parameters() if p.requires_grad
        }
        owners = {n.rsplit('.', 1)[0] if '.' in n else '' for n in trainable}
        delta = {}
        for key, value in state.items():
            owner = key.rsplit('.', 1)[0] if '.' in key else ''
            if key in trainable or owner in owners:
                delta[key] = value
        return dict(meta={}, state_dict=delta)
