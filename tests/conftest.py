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
# One thread per pytest-xdist worker (``-n 2`` on 2 cores), two otherwise;
# tools started by the tests inherit it.
os.environ.setdefault('OMP_NUM_THREADS',
                      '1' if os.environ.get('PYTEST_XDIST_WORKER') else '2')


@pytest.fixture(scope='session')
def toy_root(tmp_path_factory):
    """Both toy sets, generated once per test session."""
    from apla_mm.toydata import make_toy_data
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


class TinySegmentor:
    """Factory of small models with the structure of a segmentor
    (``backbone`` + a head), for adapter tests without a Runner."""

    @staticmethod
    def timm(depth: int = 2, dim: int = 32, heads: int = 2, seed: int = 0):
        import torch
        import torch.nn as nn

        from apla_mm.models import TimmViT
        torch.manual_seed(seed)

        class Model(nn.Module):

            def __init__(self):
                super().__init__()
                self.backbone = TimmViT(
                    'vit_base_patch16_224',
                    out_indices=(depth - 1, ),
                    model_kwargs=dict(
                        img_size=32, patch_size=8, embed_dim=dim, depth=depth,
                        num_heads=heads))
                self.head = nn.Conv2d(dim, 3, 1)

            def forward(self, x):
                return self.head(self.backbone(x)[-1])

        return Model()

    @staticmethod
    def mmseg(depth: int = 2, dim: int = 32, heads: int = 2, seed: int = 0):
        import torch
        import torch.nn as nn
        from mmseg.models.backbones import VisionTransformer
        torch.manual_seed(seed)

        class Model(nn.Module):

            def __init__(self):
                super().__init__()
                self.backbone = VisionTransformer(
                    img_size=(32, 32), patch_size=8, embed_dims=dim,
                    num_layers=depth, num_heads=heads,
                    out_indices=(depth - 1, ))
                self.backbone.init_weights()
                self.head = nn.Conv2d(dim, 3, 1)

            def forward(self, x):
                return self.head(self.backbone(x)[-1])

        return Model()


@pytest.fixture(params=['timm', 'mmseg'])
def tiny_model_factory(request):
    """Builds a fresh tiny model of the parametrised ViT family."""
    return getattr(TinySegmentor, request.param)
