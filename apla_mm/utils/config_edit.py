"""Adding apla_mm to a config without losing the base config's own entries.

mmengine merges dicts key by key but replaces lists: a config that sets
``custom_imports`` or ``custom_hooks`` replaces its base's lists. Pasting the
two APLA lines into a config whose base has lists of its own (mmdet's ViTDet
config imports ``projects.ViTDet.vitdet`` and adds ``Fp16CompresssionHook``)
would drop the base's import and hook. Two ways keep them:

* in a config file, extend the base's lists (``_base_`` is readable inside a
  ``.py`` config)::

      _base_ = ['path/to/base_with_its_own_lists.py']
      custom_imports = dict(
          imports=_base_.custom_imports.imports + ['apla_mm'],
          allow_failed_imports=False)
      custom_hooks = _base_.custom_hooks + [dict(type='APLAHook', rank=64)]

* from the command line, without editing any file: ``tools/train.py CONFIG
  --apla rank=64 seed=0`` calls :func:`add_peft_hook`.
"""
from typing import Any, Dict

from mmengine.config import Config, ConfigDict

#: The PEFT hooks of apla_mm; a config holds at most one of them.
PEFT_HOOKS = ('APLAHook', 'LoRAHook')


def _hook_type(hook: Any) -> str:
    kind = hook.get('type', '') if isinstance(hook, dict) else type(
        hook).__name__
    return str(kind).split('.')[-1]


def add_custom_import(cfg: Config, module: str = 'apla_mm') -> None:
    """Append ``module`` to ``cfg.custom_imports.imports``, keeping the
    entries already there (and ``allow_failed_imports``)."""
    imports_cfg = cfg.get('custom_imports')
    if imports_cfg is None:
        cfg.custom_imports = ConfigDict(
            imports=[module], allow_failed_imports=False)
        return
    imports = imports_cfg.get('imports', [])
    if isinstance(imports, str):
        imports = [imports]
    imports = list(imports)
    if module not in imports:
        imports.append(module)
    imports_cfg['imports'] = imports
    imports_cfg.setdefault('allow_failed_imports', False)


def add_peft_hook(cfg: Config, hook_type: str, options: Dict[str, Any]) -> dict:
    """Add a PEFT hook (and ``apla_mm`` to the imports) to a loaded config.

    The config's own ``custom_imports`` and ``custom_hooks`` are kept; the
    hook goes to the end of ``custom_hooks``.

    Args:
        cfg (Config): The config, changed in place.
        hook_type (str): ``'APLAHook'`` or ``'LoRAHook'``.
        options (dict): The hook's arguments, e.g. ``{'rank': 64}``.

    Returns:
        dict: The hook config that was added.

    Raises:
        ValueError: If the config already has a PEFT hook (change that one
            with ``--cfg-options custom_hooks.N.rank=...`` instead).
    """
    if hook_type not in PEFT_HOOKS:
        raise ValueError(f'hook_type must be one of {PEFT_HOOKS}, got '
                         f'{hook_type!r}')
    hooks = list(cfg.get('custom_hooks') or [])
    for i, hook in enumerate(hooks):
        if _hook_type(hook) in PEFT_HOOKS:
            raise ValueError(
                f'The config already has a PEFT hook ({_hook_type(hook)} at '
                f'custom_hooks.{i}); change its settings with --cfg-options '
                f'custom_hooks.{i}.rank=... instead of adding another one.')
    new = ConfigDict(type=hook_type, **options)
    hooks.append(new)
    cfg.custom_hooks = hooks
    add_custom_import(cfg, 'apla_mm')
    return new
