"""Where apla_mm's shipped files are: one place that knows the configs root.

The configs live in the repository's ``configs/`` folder. An editable
install (``pip install -e .``) imports the package from the repository, so
that folder sits next to the package; a normal install copies it into the
package as ``apla_mm/.mim/configs`` (package data, as mmseg's and mmdet's
``setup.py`` ship their configs for ``mim``). :func:`configs_root` prefers
the repository copy when there is one, so edits to ``configs/`` take effect
without reinstalling.
"""
import os.path as osp

#: The package folder (``.../apla_mm``).
PACKAGE_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

#: The folder the package is imported from: the repository in an editable
#: install, ``site-packages`` otherwise.
PACKAGE_PARENT = osp.dirname(PACKAGE_ROOT)

_REPO_CONFIGS = osp.join(PACKAGE_PARENT, 'configs')
_MIM_CONFIGS = osp.join(PACKAGE_ROOT, '.mim', 'configs')


def _is_repository(folder: str) -> bool:
    """A source checkout of apla_mm (not a ``site-packages`` that happens
    to hold a ``configs`` folder of another distribution)."""
    return osp.isfile(osp.join(folder, 'setup.py')) and osp.isdir(
        osp.join(folder, 'configs'))


def configs_root() -> str:
    """The folder of apla_mm's shipped configs.

    Returns:
        str: The repository's ``configs/`` in an editable install (or when
        the package is imported from a checkout), else the installed
        package's ``apla_mm/.mim/configs``.

    Raises:
        FileNotFoundError: Neither exists (an install built without its
            package data).
    """
    if _is_repository(PACKAGE_PARENT):
        return _REPO_CONFIGS
    if osp.isdir(_MIM_CONFIGS):
        return _MIM_CONFIGS
    raise FileNotFoundError(
        f'apla_mm ships its configs in {_MIM_CONFIGS} (or {_REPO_CONFIGS} '
        'in a source checkout); neither exists. Reinstall apla_mm '
        '(pip install .) or install it from the repository in editable '
        'mode (pip install -e .).')


def config_path(path: str) -> str:
    """Absolute path of a shipped config.

    Args:
        path (str): Relative to the configs root (``'finetune/x.py'``) or
            as the repository names it (``'configs/finetune/x.py'``); an
            absolute path is returned as it is.

    Returns:
        str: The file under :func:`configs_root`.
    """
    if osp.isabs(path):
        return path
    parts = osp.normpath(path).split(osp.sep)
    if parts[0] == 'configs':
        parts = parts[1:]
    return osp.join(configs_root(), *parts)


__all__ = ['PACKAGE_PARENT', 'PACKAGE_ROOT', 'config_path', 'configs_root']
