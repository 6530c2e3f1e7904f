"""Shared fixtures: toy data in a temp dir, config loading, tiny models."""
import os
import os.path as osp
import sys

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = osp.join(REPO, 'configs')
TOOLS = osp.join(REPO, 'tools')

# Keep the repo importable for `python -m pytest` from anywhere, and make
# sure mmsegmentation's wheel-installed top-level `tests` package is never
# confused with this folder (we do not import `tests.*`).
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault('OMP_NUM_THREADS', '2')


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """Both toy sets, generated once per test session."""
    from apla_mm.datasets import make_toy_data
    root = tmp_path_factory.mktemp('toy')
    make_toy_data(str(root), ('seg', 'coco'), num_train=24, num_val=8)
    return str(root)


@pytest.fixture(scope='session')
def toy_seg_root(toy_root):
    return osp.join(toy_root, 'toy_seg')


@pytest.fixture(scope='session')
def toy_coco_root(toy_root):
    return osp.join(toy_root, 'toy_coco')


def config_path(*parts: str) -> str:
    return osp.join(CONFIGS, *parts)
