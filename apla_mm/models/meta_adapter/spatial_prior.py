"""Convolutional spatial prior module (SPM) of ViT adapters.

The layout of ViT-Adapter's SPM (Chen et al., "Vision Transformer Adapter
for Dense Predictions", ICLR 2023), which META (Zhang et al., ICLR 2025)
keeps under the same name: a ResNet-style stem to stride 4 and three
stride-2 convolutions to strides 8, 16 and 32, each level projected to the
adapter width by a 1x1 convolution.
"""
from typing import List, Optional

import torch
import torch.nn as nn
from mmcv.cnn import ConvModule

__all__ = ['SpatialPriorModule']


class SpatialPriorModule(nn.Module):
    """Multi-scale convolutional features at strides 4, 8, 16 and 32.

    ``stem``: conv3x3/s2 (``in_channels`` -> ``inplanes``), conv3x3, conv3x3
    (each norm + ReLU), max-pool 3x3/s2 -> level 1 (stride 4, ``inplanes``);
    ``conv2``/``conv3``/``conv4``: conv3x3/s2 + norm + ReLU to ``2*inplanes``
    (stride 8), ``4*inplanes`` (16), ``4*inplanes`` (32); ``fc1``-``fc4``:
    1x1 convs to ``embed_dim``. Every stride-2 layer pads by 1, so an
    ``H x W`` input gives levels of ``ceil(H/s) x ceil(W/s)``.

    Args:
        embed_dim (int): Output channels of every level.
        inplanes (int): Stem width. Defaults to 64.
        in_channels (int): Image channels. Defaults to 3.
        norm_cfg (dict, optional): Norm of the conv layers.
            Defaults to ``dict(type='BN')``.
    """

    def __init__(self,
                 embed_dim: int,
                 inplanes: int = 64,
                 in_channels: int = 3,
                 norm_cfg: Optional[dict] = None) -> None:
        super().__init__()
        norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)

        def conv(cin: int, cout: int, stride: int) -> ConvModule:
            return ConvModule(
                cin,
                cout,
                3,
                stride=stride,
                padding=1,
                bias=False,
                norm_cfg=norm_cfg,
                act_cfg=dict(type='ReLU'))

        c = inplanes
        self.stem = nn.Sequential(
            conv(in_channels, c, 2), conv(c, c, 1), conv(c, c, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = conv(c, 2 * c, 2)
        self.conv3 = conv(2 * c, 4 * c, 2)
        self.conv4 = conv(4 * c, 4 * c, 2)
        self.fc1 = nn.Conv2d(c, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * c, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * c, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * c, embed_dim, 1)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Return the four levels, ``(B, embed_dim, ceil(H/s), ceil(W/s))``
        for ``s`` = 4, 8, 16, 32."""
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        return [self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)]
