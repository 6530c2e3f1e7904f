"""What every PEFT hook does to the Runner, whichever the method."""
from typing import Optional

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log

from apla_mm.peft.base import (META_KEY, BaseAdapter, PeftConfig,
                               adapter_class)
from apla_mm.peft.optim import rebind_optimizer
from apla_mm.peft.report import count_parameters, format_report
from apla_mm.peft.utils import unwrap_model
from apla_mm.utils.load_guard import (PretrainedLoadRecorder,
                                      check_frozen_pretrained)
from ..runner_utils import check_same_on_all_ranks, is_training, rewrap_ddp


class BasePEFTHook(Hook):
    """Apply a PEFT adapter to the Runner's model before training.

    mmengine builds the model, its DDP wrapper and the optimizer before any
    hook runs. In ``before_run`` of a training run this hook therefore

    1. builds the adapter on the unwrapped model (:meth:`build_adapter`),
       which freezes the backbone and creates the trainable tensors;
    2. moves the existing optimizer onto them: each adapted weight's place
       in its parameter group goes to its stand-ins, frozen parameters leave
       (no state or gradient for them; groups and schedulers unchanged), and
       lets the adapter hook into the optimizer (:meth:`bind_optim_wrapper`;
       APLA copies its rows into W_O after each step);
    3. rebuilds a DDP wrapper with the same settings, so that frozen
       parameters are not synchronised and the new ones are;
    4. checks that every process made the same choices and logs the
       trainable-parameter report;
    5. starts recording the loads of pretrained weights that mmengine's
       ``_init_model_weights`` (and ``load_from``/``--resume``) then do. When
       training starts (``before_train_epoch``), a frozen module whose
       pretrained weights did not load completely -- entries missing in the
       file, of another shape, or file entries of the module's own parts it
       does not have -- stops the run with
       :class:`~apla_mm.utils.load_guard.IncompletePretrainedLoadError`,
       which lists them: frozen, they would stay random for the whole run.
       Intentional partial loads are allowed with
       ``allow_partial_pretrained = [regex, ...]`` at the top level of the
       config (or ``tools/train.py --allow-partial-pretrained REGEX``),
       full-matched on entry names such as ``backbone.vit.pos_embed`` (see
       :mod:`apla_mm.utils.load_guard`).

    It stores the adapter's description in ``meta['apla_mm']`` of every
    checkpoint and, on ``--resume``, refuses a checkpoint trained with other
    settings (:meth:`check_resume`).

    The hook is glue: what the method does lives in its adapter
    (:class:`~apla_mm.peft.base.BaseAdapter`). Subclasses set :attr:`method`
    and :attr:`config` (the method's :class:`~apla_mm.peft.base.PeftConfig`)
    and may override :meth:`build_adapter` and :meth:`summary_title`.
    """

    priority = 'VERY_HIGH'
    #: Name stored in the checkpoint meta (``'apla'``, ``'lora'``).
    method = ''
    #: How the report describes the frozen modules.
    frozen_note = 'frozen except the adapter'
    #: Whether validation/testing outside training needs the adapter too
    #: (e.g. to load LoRA factors); APLA's checkpoints are plain models.
    apply_for_inference = False
    #: Regexes (full-matched on the model's entry names) of frozen entries
    #: allowed to stay without pretrained weights, added to the config's
    #: top-level ``allow_partial_pretrained`` (see
    #: :mod:`apla_mm.utils.load_guard`).
    allow_partial_pretrained: tuple = ()

    def __init__(self, config: PeftConfig) -> None:
        #: The method's settings.
        self.config = config
        self.adapter: Optional[BaseAdapter] = None
        self._restored = False

    # -- what a method may override ------------------------------------
    def build_adapter(self, model) -> BaseAdapter:
        """Apply the method to ``model`` (in place) and return the adapter
        (also usable outside a Runner, e.g. for benchmarks: train the
        model's trainable parameters and call
        ``adapter.attach_optimizer(optimizer)``)."""
        return adapter_class(self.method)(model, self.config)

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

    def bind_optim_wrapper(self, optim_wrapper) -> None:
        """Connect the adapter to the optimizer: it installs what keeps the
        weights consistent (APLA: a step post-hook copying its rows into
        W_O), whichever wrapper drives the optimizer."""
        self.adapter.attach_optimizer(optim_wrapper.optimizer)

    def check_resume(self, meta: dict) -> None:
        """Raise unless a checkpoint's meta matches the current settings;
        then let the adapter take over what the checkpoint decided."""
        problems = self.adapter.resume_problems(meta)
        if problems:
            raise ValueError(
                f'The checkpoint being resumed was trained with other '
                f'{self.method} settings: ' + '; '.join(problems) + '. '
                "Resume with the checkpoint's settings, or start a new run "
                'from its weights with `load_from` instead of --resume.')
        self.adapter.restore_(meta)

    def summary_title(self) -> str:
        return f'{self.method}: {self.adapter.num_trainable():,} trainable ' \
            'entries in the adapted layers.'

    # -- Runner stages -------------------------------------------------
    def before_run(self, runner) -> None:
        if self.adapter is not None:
            return
        training = is_training(runner)
        if not training and not self.apply_for_inference:
            return
        if training:
            self.check_optim_wrapper(runner.optim_wrapper)
        model = unwrap_model(runner.model)
        self.adapter = self.build_adapter(model)
        if not training:
            return
        rebind_optimizer(runner.optim_wrapper.optimizer,
                         self.adapter.replacements(), model)
        self.bind_optim_wrapper(runner.optim_wrapper)
        if rewrap_ddp(runner):
            print_log(
                f'{self.method}: rebuilt the DDP wrapper; frozen parameters '
                'are not synchronised.', logger='current')
        check_same_on_all_ranks(self.adapter.meta(),
                                f'The {self.method} configuration')
        self.log_summary(runner)
        # Record the pretrained loads of _init_model_weights/load_or_resume,
        # which mmengine runs after before_run; checked when training starts.
        self._load_recorder = PretrainedLoadRecorder().start()

    def before_train_epoch(self, runner) -> None:
        # The first hook after the weights are initialised and loaded that
        # every PEFT hook inherits (APLAHook overrides before_train).
        recorder = getattr(self, '_load_recorder', None)
        if recorder is None:
            return
        self._load_recorder = None
        loads = recorder.stop()
        model = unwrap_model(runner.model)
        created = {id(p) for p in self.adapter.adapted_parameters()}
        allowed = check_frozen_pretrained(
            model, loads, self.adapter.config.frozen_modules, self.method,
            allow=tuple(runner.cfg.get('allow_partial_pretrained') or ())
            + tuple(self.allow_partial_pretrained),
            exclude=[n for n, p in model.named_parameters()
                     if id(p) in created])
        if allowed:
            print_log(
                f'{self.method}: frozen entries left without pretrained '
                f'weights, as allowed by allow_partial_pretrained: '
                f'{allowed.describe()}', logger='current', level=30)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.adapter is not None:
            checkpoint.setdefault('meta', {})[META_KEY] = self.adapter.meta()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.adapter is None or not is_training(runner) \
                or not getattr(runner, '_resume', False):
            # Testing, or `load_from`: the state dict is loaded as weights.
            return
        meta = checkpoint.get('meta', {}).get(META_KEY)
        if meta is None or meta.get('method') != self.method:
            raise ValueError(
                f'Cannot resume a {self.method} run from a checkpoint that '
                f'was not written by one (meta["apla_mm"] is '
                f'{None if meta is None else meta.get("method")!r}). To start '
                'from its weights use `load_from=<checkpoint>` without '
                '--resume.')
        self.check_resume(meta)
        self._restored = True

    # -- helpers -------------------------------------------------------
    def log_summary(self, runner) -> None:
        model = unwrap_model(runner.model)
        parts = count_parameters(
            model, shadow=self.adapter.shadow_parameters())
        notes = {
            p: self.frozen_note
            for p in self.adapter.config.frozen_modules if p in parts
        }
        print_log(
            format_report(parts, self.summary_title(), notes),
            logger='current')
