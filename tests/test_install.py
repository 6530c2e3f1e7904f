"""The supported stacks: what setup.py promises is what the install script
installs and CI tests, and the install tools refuse what they cannot do."""
import ast
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPO

CONSTRAINTS = osp.join(REPO, 'tools', 'constraints')


def _setup_literal(name: str):
    """The literal value assigned to (or passed as) ``name`` in setup.py."""
    tree = ast.parse(open(osp.join(REPO, 'setup.py')).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
                getattr(t, 'id', None) == name for t in node.targets):
            return ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f'{name} not found in setup.py')


def _requirements():
    return {Requirement(r).name: Requirement(r)
            for r in _setup_literal('install_requires')}


def _stack_pins():
    """{stack: {name: pinned version}} from tools/constraints/torch-*.txt."""
    stacks = {}
    for fname in sorted(os.listdir(CONSTRAINTS)):
        if not (fname.startswith('torch-') and fname.endswith('.txt')):
            continue  # e.g. the GPU machine's exclusion list
        pins = {}
        for line in open(osp.join(CONSTRAINTS, fname)):
            line = line.split('#')[0].strip()
            if '==' in line:
                name, version = line.split('==')
                pins[name] = version
        stacks[fname[len('torch-'):-len('.txt')]] = pins
    return stacks


def test_setup_torch_range_is_exactly_the_tested_stacks():
    stacks = _stack_pins()
    assert set(stacks) == {'2.1.2', '2.13.0'}
    torch_range = _requirements()['torch'].specifier
    tested = sorted(Version(v) for v in stacks)
    assert str(torch_range) in ('>=2.1.2,<=2.13.0', '<=2.13.0,>=2.1.2')
    for version in tested:
        assert torch_range.contains(version)
        assert stacks[str(version)]['torch'] == str(version)
    for version in ('2.1.1', '2.14.0'):
        assert not torch_range.contains(version)


def test_running_stack_is_within_the_promised_ranges():
    torch_range = _requirements()['torch'].specifier
    assert torch_range.contains(torch.__version__.split('+')[0])
    python = '.'.join(map(str, sys.version_info[:3]))
    assert SpecifierSet(_setup_literal('python_requires')).contains(python)


def test_mmcv_was_built_for_this_torch():
    """tools/install.sh records which torch/CUDA/Python its mmcv was built
    for; a venv whose torch changed afterwards would show another key."""
    key_file = osp.join(sys.prefix, '.apla_mm-mmcv-key')
    if not osp.exists(key_file):
        pytest.skip('environment not made by tools/install.sh')
    key = open(key_file).read().strip()
    assert f'-torch{torch.__version__}-' in key
    assert key.startswith(f'cp{sys.version_info[0]}{sys.version_info[1]}-')
    assert f'-cuda{torch.version.cuda or "none"}-' in key
    import mmcv.ops  # noqa: F401  (the compiled ops load in this torch)


def test_wheelhouse_holds_every_install_requirement():
    """tools/make_wheelhouse.sh resolves what setup.py needs (torch,
    torchvision and mmcv excepted: the target's own, and built there)."""
    script = open(osp.join(REPO, 'tools', 'make_wheelhouse.sh')).read()
    block = re.search(r'REQUIREMENTS=\((.*?)\n\)', script, re.S).group(1)
    listed = {Requirement(tok.strip("'")).name.lower()
              for tok in block.split() if not tok.startswith('#')}
    needed = {n.lower() for n in _requirements()} - {
        'torch', 'torchvision', 'mmcv', 'timm'}
    assert needed <= listed, needed - listed
    assert 'timm==' in open(osp.join(CONSTRAINTS, 'torch-2.13.0.txt')).read()


def _bash(*args, env=None):
    return subprocess.run(['bash', *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})},
                          timeout=60)


def test_install_refuses_an_untested_stack(tmp_path):
    venv = tmp_path / 'venv'
    result = _bash('tools/install.sh', env=dict(APLA_TORCH='2.5.0',
                                                APLA_VENV=str(venv)))
    assert result.returncode == 1
    assert 'APLA_TORCH=2.5.0 is not a tested stack' in result.stderr
    assert '2.1.2' in result.stderr and '2.13.0' in result.stderr
    assert not venv.exists()


def test_install_refuses_unknown_arguments_and_empty_wheelhouse(tmp_path):
    result = _bash('tools/install.sh', '--wheelhose', str(tmp_path))
    assert result.returncode == 2 and "unknown argument '--wheelhose'" \
        in result.stderr
    venv = tmp_path / 'venv'
    # a folder without requirements.txt is refused before anything is made
    result = _bash('tools/install.sh', '--wheelhouse', str(tmp_path),
                   env=dict(APLA_VENV=str(venv)))
    assert result.returncode == 1
    assert 'has no requirements.txt' in result.stderr
    assert 'tools/make_wheelhouse.sh' in result.stderr
    assert not venv.exists()


def test_install_refuses_pythons_outside_the_range(tmp_path):
    venv = tmp_path / 'venv'
    fake = tmp_path / 'python3.13'
    fake.write_text('#!/bin/sh\necho 3.13\n')
    fake.chmod(0o755)
    result = _bash('tools/install.sh', env=dict(APLA_VENV=str(venv),
                                                PYTHON=str(fake)))
    assert result.returncode == 1
    assert 'Python 3.13 is not supported (3.10-3.12)' in result.stderr
    fake.write_text('#!/bin/sh\necho 3.12\n')
    result = _bash('tools/install.sh', env=dict(APLA_VENV=str(venv),
                                                PYTHON=str(fake),
                                                APLA_TORCH='2.1.2'))
    assert result.returncode == 1
    assert 'torch 2.1.2 has no wheels for Python 3.12' in result.stderr
    assert not venv.exists()


def test_make_wheelhouse_never_writes_into_a_used_folder(tmp_path):
    (tmp_path / 'keep.whl').write_text('x')
    result = _bash('tools/make_wheelhouse.sh', str(tmp_path))
    assert result.returncode == 2 and 'not empty' in result.stderr
    assert (tmp_path / 'keep.whl').read_text() == 'x'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.whl']
