"""What every PEFT hook does to the Runner, whichever the method."""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from apla_mm.peft.base import (META_KEY, BaseAdapter, PeftConfig,
                               adapter_class, get_adapter)
from apla_mm.peft.optim import rebind_optimizer
from apla_mm.peft.report import count_parameters, format_report
from apla_mm.peft.utils import unwrap_model
from apla_mm.registry import HOOKS
from apla_mm.utils.load_guard import (PretrainedLoadRecorder,
                                      check_frozen_pretrained)
from ..runner_utils import check_same_on_all_ranks, is_training, rewrap_ddp


@HOOKS.register_module()
class PEFTHook(Hook):
    """Connect a PEFT adapter to the Runner.

    Two ways to adapt a model, the same training (bit-identical for the same
    seed, ``tests/test_peft_model.py``):

    * **the drop-in** -- a method's hook (:class:`APLAHook`,
      :class:`LoRAHook`) builds the adapter itself in ``before_run``;
    * **at build time** -- ``model = dict(type='PEFTModel', model=...,
      method='apla', rank=64)`` (:func:`apla_mm.models.PEFTModel`) builds the
      model adapted, so the optimizer, a DDP/FSDP wrapper and any other
      wrapper see the adapted model from the start; ``custom_hooks =
      [dict(type='PEFTHook')]`` then adds what needs the Runner.

    In ``before_run`` of a training run this hook

    1. builds the adapter on the unwrapped model, or takes over the one the
       model was built with. A hook builds after mmengine built the
       optimizer and the DDP wrapper, so it then moves the optimizer onto
       the adapter's tensors (each adapted weight's place in its parameter
       group goes to its stand-ins, frozen parameters leave: no state or
       gradient for them; groups and schedulers unchanged) and rebuilds the
       DDP wrapper with the same settings, so that frozen parameters are not
       synchronised and the new ones are;
    2. lets the adapter hook into the optimizer
       (:meth:`~apla_mm.peft.base.BaseAdapter.attach_optimizer`; APLA copies
       its rows into W_O right after each step);
    3. checks that every process made the same choices and logs the
       trainable-parameter report;
    4. starts recording the loads of pretrained weights that mmengine's
       ``_init_model_weights`` (and ``load_from``/``--resume``) then do
       (:class:`~apla_mm.utils.load_guard.PretrainedLoadRecorder`).

    When training starts (``before_train``) a frozen module whose pretrained
    weights did not load completely -- entries missing in the file, of
    another shape, or file entries of the module's own parts it does not
    have -- stops the run with
    :class:`~apla_mm.utils.load_guard.IncompletePretrainedLoadError`, which
    lists them: frozen, they would stay random for the whole run.
    Intentional partial loads are allowed with ``allow_partial_pretrained =
    [regex, ...]`` at the top level of the config (or ``tools/train.py
    --allow-partial-pretrained REGEX``), full-matched on entry names such as
    ``backbone.vit.pos_embed``. Then the adapter takes the loaded weights
    over (:meth:`~apla_mm.peft.base.BaseAdapter.on_weights_loaded`: APLA
    chooses norm-selected channels or reloads its rows).

    It stores the adapter's description in ``meta['apla_mm']`` of every
    checkpoint and, on ``--resume``, refuses a checkpoint trained with other
    settings (:meth:`check_resume`). Validation and testing outside training
    run the plain model; a method whose checkpoints hold more than the plain
    model (LoRA's factors) is merged first
    (:meth:`~apla_mm.peft.base.BaseAdapter.merge_for_inference`).

    The hook is glue: what a method does and says lives in its adapter
    (:class:`~apla_mm.peft.base.BaseAdapter`). A method's hook sets
    :attr:`method` and builds its config from its keyword arguments, which
    are documented once, on the config dataclass.

    Args:
        config (PeftConfig, optional): The method's settings; ``None`` (the
            generic ``PEFTHook``): take over the adapter the model was built
            with.
    """

    priority = 'VERY_HIGH'
    #: Name stored in the checkpoint meta (``'apla'``, ``'lora'``); empty
    #: for the generic hook.
    method = ''
    #: Regexes (full-matched on the model's entry names) of frozen entries
    #: allowed to stay without pretrained weights, added to the config's
    #: top-level ``allow_partial_pretrained`` (see
    #: :mod:`apla_mm.utils.load_guard`).
    allow_partial_pretrained: tuple = ()

    def __init__(self, config: Optional[PeftConfig] = None) -> None:
        #: The method's settings (``None`` until taken over).
        self.config = config
        self.adapter: Optional[BaseAdapter] = None
        self._restored = False
        self._merged = False
        self._load_recorder: Optional[PretrainedLoadRecorder] = None

    @property
    def name(self) -> str:
        """The method, for messages."""
        return self.method or (self.adapter.method if self.adapter else
                               'PEFT')

    # -- building ------------------------------------------------------
    def build_adapter(self, model) -> BaseAdapter:
        """Apply the method to ``model`` (in place) and return the adapter."""
        return adapter_class(self.method)(model, self.config)

    def _take_over(self, model) -> Optional[BaseAdapter]:
        """The adapter the model was built with (checked against this
        hook's settings), or None."""
        adapter = get_adapter(model)
        if adapter is None:
            return None
        if self.method and adapter.method != self.method:
            raise ValueError(
                f'The model was built with a {adapter.method!r} adapter '
                f'(PEFTModel), but the config also has the {self.method!r} '
                "hook. Keep one: model=dict(type='PEFTModel', ...) with "
                "custom_hooks=[dict(type='PEFTHook')], or the plain model "
                'with the method hook.')
        if self.config is not None and \
                self.config.to_dict() != adapter.config.to_dict():
            raise ValueError(
                f'The model was built with {adapter.method} settings '
                f'{adapter.config.to_dict()} (PEFTModel), but the hook has '
                f'{self.config.to_dict()}. Give the settings in one place: '
                "use custom_hooks=[dict(type='PEFTHook')] with PEFTModel.")
        self.config = adapter.config
        return adapter

    def check_optim_wrapper(self, optim_wrapper) -> None:
        """Raise if the optimizer wrapper cannot train this method.

        Any wrapper holding one ``optimizer`` works (``OptimWrapper``,
        ``AmpOptimWrapper``, subclasses and wrappers of one's own): nothing
        here depends on the wrapper's type.
        """
        from mmengine.optim import OptimWrapperDict
        if isinstance(optim_wrapper, OptimWrapperDict) or not isinstance(
                getattr(optim_wrapper, 'optimizer', None),
                torch.optim.Optimizer):
            raise TypeError(
                f'{type(self).__name__} trains models with one optimizer, '
                f'but the optimizer wrapper is {type(optim_wrapper).__name__}'
                ' (several optimizers or none). Use a single optim_wrapper = '
                "dict(type='OptimWrapper' or 'AmpOptimWrapper', optimizer="
                '...) for a PEFT run.')

    def check_resume(self, meta: dict) -> None:
        """Raise unless a checkpoint's meta matches the current settings;
        then let the adapter take over what the checkpoint decided."""
        problems = self.adapter.resume_problems(meta)
        if problems:
            raise ValueError(
                f'The checkpoint being resumed was trained with other '
                f'{self.name} settings: ' + '; '.join(problems) + '. '
                "Resume with the checkpoint's settings, or start a new run "
                'from its weights with `load_from` instead of --resume.')
        self.adapter.restore_(meta)

    # -- Runner stages -------------------------------------------------
    def before_run(self, runner) -> None:
        if self.adapter is not None:
            return
        training = is_training(runner)
        model = unwrap_model(runner.model)
        self.adapter = self._take_over(model)
        built_here = self.adapter is None
        if built_here:
            if not self.method:
                raise ValueError(
                    "PEFTHook takes over the adapter of a model built with "
                    "model=dict(type='PEFTModel', ...), but this model has "
                    'none. Build the model with PEFTModel, or use a method '
                    "hook (dict(type='APLAHook', rank=64)).")
            if not training and not adapter_class(
                    self.method).merges_for_inference:
                return  # inference runs the plain model
        if training:
            self.check_optim_wrapper(runner.optim_wrapper)
        if built_here:
            self.adapter = self.build_adapter(model)
        if not training:
            return
        if built_here:
            rebind_optimizer(runner.optim_wrapper.optimizer,
                             self.adapter.replacements(), model)
            if rewrap_ddp(runner):
                print_log(
                    f'{self.name}: rebuilt the DDP wrapper; frozen '
                    'parameters are not synchronised.', logger='current')
        self.adapter.attach_optimizer(runner.optim_wrapper.optimizer)
        check_same_on_all_ranks(self.adapter.meta(),
                                f'The {self.name} configuration')
        self.log_summary(runner)
        # Record the pretrained loads of _init_model_weights/load_or_resume,
        # which mmengine runs after before_run; checked when training starts.
        self._load_recorder = PretrainedLoadRecorder(
            model, self.adapter.config.frozen_modules).start()

    def before_train(self, runner) -> None:
        if self.adapter is None or not is_training(runner):
            return
        self.check_pretrained_loads(runner)
        # The weights are now initialised or loaded.
        self.adapter.on_weights_loaded()
        check_same_on_all_ranks(self.adapter.meta(),
                                f'The {self.name} layers')
        self.after_weights_loaded(runner)

    def after_weights_loaded(self, runner) -> None:
        """What a method's hook adds once training starts (nothing here)."""

    def before_val(self, runner) -> None:
        self._merge_for_inference(runner)

    def before_test(self, runner) -> None:
        self._merge_for_inference(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.adapter is not None and self.adapter.layers:
            checkpoint.setdefault('meta', {})[META_KEY] = self.adapter.meta()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.adapter is None or not is_training(runner) \
                or not getattr(runner, '_resume', False):
            # Testing, or `load_from`: the state dict is loaded as weights.
            return
        meta = checkpoint.get('meta', {}).get(META_KEY)
        if meta is None or meta.get('method') != self.adapter.method:
            raise ValueError(
                f'Cannot resume a {self.name} run from a checkpoint that '
                f'was not written by one (meta["apla_mm"] is '
                f'{None if meta is None else meta.get("method")!r}). To start '
                'from its weights use `load_from=<checkpoint>` without '
                '--resume.')
        self.check_resume(meta)
        self._restored = True

    # -- helpers -------------------------------------------------------
    def check_pretrained_loads(self, runner) -> None:
        """Stop recording and refuse incomplete pretrained loads of the
        frozen modules (see the class docstring)."""
        recorder, self._load_recorder = self._load_recorder, None
        if recorder is None:
            return
        loads = recorder.stop()
        model = unwrap_model(runner.model)
        created = {id(p) for p in self.adapter.adapted_parameters()}
        allowed = check_frozen_pretrained(
            model, loads, self.adapter.config.frozen_modules, self.name,
            allow=tuple(runner.cfg.get('allow_partial_pretrained') or ())
            + tuple(self.allow_partial_pretrained),
            exclude=[n for n, p in model.named_parameters()
                     if id(p) in created])
        if allowed:
            print_log(
                f'{self.name}: frozen entries left without pretrained '
                f'weights, as allowed by allow_partial_pretrained: '
                f'{allowed.describe()}', logger='current', level=30)

    def _merge_for_inference(self, runner) -> None:
        if self.adapter is None or self._merged or is_training(runner) \
                or not self.adapter.merges_for_inference:
            return
        self.adapter.merge_for_inference()
        self._merged = True
        print_log(f'{self.name}: merged into the weights for inference.',
                  logger='current')

    def log_summary(self, runner) -> None:
        model = unwrap_model(runner.model)
        parts = count_parameters(
            model, shadow=self.adapter.shadow_parameters())
        notes = {
            p: self.adapter.frozen_note
            for p in self.adapter.config.frozen_modules if p in parts
        }
        print_log(
            format_report(parts, self.adapter.describe(), notes),
            logger='current')


#: The name the method hooks derive from (apla_mm 0.2).
BasePEFTHook = PEFTHook
