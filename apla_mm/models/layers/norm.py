"""Channel-wise LayerNorm for NCHW feature maps."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from apla_mm.registry import MODELS


@MODELS.register_module()
class LN2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of ``(N, C, H, W)`` maps.

    Every spatial position is normalised over its ``C`` channels, with a
    learnable per-channel scale and shift: the ``LayerNorm`` that ViTDet
    (Li et al., "Exploring Plain Vision Transformer Backbones for Object
    Detection", arXiv 2203.16527) uses in its simple feature pyramid and
    heads instead of BatchNorm, so that detection works with small
    per-device batches (mmdet's ``projects/ViTDet/vitdet/layer_norm.py`` and
    detectron2's ``detectron2/layers/batch_norm.py::LayerNorm`` define the
    same layer). The forward permutes to NHWC, applies
    :func:`torch.nn.functional.layer_norm` and permutes back; the result is
    made contiguous again, since mmcv's CPU ``RoIAlign`` kernel and ``.view``
    calls in heads expect standard NCHW strides.

    Registered in mmengine's root ``MODELS`` so that mmcv's
    ``build_norm_layer`` and ``ConvModule`` build it from
    ``norm_cfg=dict(type='LN2d')`` in mmdet- and mmseg-scoped configs. As a
    subclass of :class:`torch.nn.LayerNorm` it is named ``ln`` by
    ``build_norm_layer`` and counts as a norm layer for ``norm_decay_mult``
    of mmengine's optimizer constructor.

    Args:
        num_channels (int): Channels ``C`` of the input.
        eps (float): Added to the variance. Defaults to 1e-6 (mind that
            ``build_norm_layer`` passes ``eps=1e-5`` unless ``norm_cfg``
            sets ``eps``).
        elementwise_affine (bool): Learn a scale and a shift per channel.
            Defaults to True.
    """

    def __init__(self,
                 num_channels: int,
                 eps: float = 1e-6,
                 elementwise_affine: bool = True) -> None:
        super().__init__(
            num_channels, eps=eps, elementwise_affine=elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f'LN2d expects (N, C, H, W) inputs, got shape '
                             f'{tuple(x.shape)}.')
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2).contiguous()
