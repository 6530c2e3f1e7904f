"""Refuse checkpoints that do not fit the model before mmengine loads them."""
from mmengine.hooks import Hook
from mmengine.logging import print_log

from apla_mm.peft.base import META_KEY, get_adapter
from apla_mm.peft.utils import unwrap_model
from apla_mm.registry import HOOKS
from apla_mm.utils.checkpoint_io import (check_state_dict_match,
                                         state_dict_of)
from ..runner_utils import is_training
from .peft_hook import PEFTHook


@HOOKS.register_module()
class CheckpointCheckHook(Hook):
    """Check every checkpoint the Runner loads (``load_from``, ``--resume``,
    ``tools/test.py``) against the model.

    mmengine loads checkpoints with ``strict=False`` and only prints the
    entries that did not match (``mmengine/runner/checkpoint.py``,
    ``load_state_dict``), so a checkpoint of another model evaluates with
    random weights. In ``after_load_checkpoint`` -- after the PEFT hooks
    adapted the model, before the weights are copied -- this hook

    * compares the checkpoint's state dict with the model's
      (:func:`apla_mm.utils.checkpoint_io.check_state_dict_match`): nothing
      in common is always an error; missing, extra or reshaped entries are
      an error unless ``allow_partial``;
    * refuses to ``--resume`` a checkpoint written by a PEFT run
      (``meta['apla_mm']``) with a config that has no such hook: its
      optimizer state holds the PEFT parameters only, and mmengine's error
      would be a parameter-group mismatch.

    ``tools/train.py`` and ``tools/test.py`` register it
    (``--allow-partial-checkpoint`` sets ``allow_partial``).

    Args:
        allow_partial (bool): Accept checkpoints that fit only partly.
            Defaults to False.
    """

    priority = 'LOW'

    def __init__(self, allow_partial: bool = False) -> None:
        self.allow_partial = allow_partial

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        resuming = is_training(runner) and getattr(runner, '_resume', False)
        meta = (checkpoint.get('meta') or {}).get(META_KEY) \
            if isinstance(checkpoint, dict) else None
        if resuming and meta is not None:
            methods = {
                h.name for h in runner.hooks if isinstance(h, PEFTHook)
            }
            if meta.get('method') not in methods:
                settings = meta.get('config', {})
                raise ValueError(
                    f'The checkpoint being resumed was written by an '
                    f'{str(meta.get("method")).upper()} run ({settings}); '
                    'this config trains without that method, so its '
                    'optimizer state does not fit. Resume with the config '
                    'the run was trained with (dumped into its work dir), or '
                    'start a new run from these weights with '
                    '`--cfg-options load_from=<checkpoint>` and without '
                    '--resume.')
        model = unwrap_model(runner.model)
        state = state_dict_of(checkpoint)
        model_state = model.state_dict()
        adapter = get_adapter(model)
        if adapter is not None:
            # a plain checkpoint lacks the method's own new entries (LoRA's
            # factors before training), which keep their initial values
            completed = adapter.complete_state_dict(state)
            state = dict(state, **{k: v for k, v in completed.items()
                                   if k not in state and k in model_state})
        result = check_state_dict_match(
            model_state, state,
            source=str(getattr(runner, '_load_from', None) or 'checkpoint'),
            allow_partial=self.allow_partial)
        if not result.complete:
            print_log(
                'Loading a partial checkpoint (--allow-partial-checkpoint): '
                f'{result.describe(limit=8)}', logger='current', level=30)
