"""ViTDet's simple feature pyramid: a multi-scale pyramid from one ViT map."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmengine.model import BaseModule

from apla_mm.registry import MODELS

ConfigType = Optional[dict]


def _log2_scale(scale: float) -> int:
    """``log2(scale)`` for a power-of-two ``scale`` (1/8 ... 8), else error."""
    if scale <= 0:
        raise ValueError(f'scale factors must be positive, got {scale}')
    steps = math.log2(scale)
    if abs(steps - round(steps)) > 1e-9 or abs(steps) > 3:
        raise ValueError(
            'SimpleFPN builds levels by repeated 2x up-/down-sampling, so '
            'every scale factor must be a power of two between 1/8 and 8 '
            f'(e.g. 4.0, 2.0, 1.0, 0.5), got {scale}.')
    return int(round(steps))


@MODELS.register_module()
class SimpleFPN(BaseModule):
    """Simple feature pyramid of ViTDet for plain, single-scale backbones.

    Li et al., "Exploring Plain Vision Transformer Backbones for Object
    Detection" (ECCV 2022, arXiv 2203.16527), Sec. 3 / Fig. 2 (c): a plain
    ViT gives one map at stride ``p`` (the patch size, usually 16). The
    pyramid is built from that *last* map alone, in parallel, without the
    top-down and lateral fusion of an FPN:

    * scale 4 (stride p/4): two stride-2 transposed convolutions, with a
      norm and GELU between them (channels ``C -> C/2 -> C/4``);
    * scale 2 (stride p/2): one stride-2 transposed convolution (``C/2``);
    * scale 1 (stride p): the map itself (``C``);
    * scale 1/2 (stride 2p): 2x2 max pooling with stride 2 (``C``).

    Each level then goes through a 1x1 lateral conv and a 3x3 output conv,
    both to ``out_channels`` and followed by ``norm_cfg`` (channel-wise
    LayerNorm, :class:`~apla_mm.models.LN2d`, by default) without
    activation. Levels beyond ``len(scale_factors)`` (``num_outs=5``: the
    stride-64 level of mmdet's RPN) are max-pooled from the last one with
    kernel 1 and stride 2, as in mmdet's ``FPN`` without extra convs. The
    output is a tuple of ``num_outs`` NCHW maps, finest first, as mmdet's
    ``RPNHead`` and ``SingleRoIExtractor`` expect (``strides=[4, 8, 16, 32,
    64]`` for a stride-16 input with the default factors).

    Map sizes. For an input map of ``h x w`` the level of scale ``s`` has
    ``ceil(h * s) x ceil(w * s)``: up-sampling is exact and every
    down-sampling step rounds *up* (``ceil_mode`` pooling), like the
    stride-2 convolutions of a ResNet. For a padded image of ``H x W``
    divisible by the patch size ``p``, the level of stride ``t`` is thus
    ``ceil(H / t) x ceil(W / t)``: exactly ``H / t`` when ``t`` divides the
    padded size (mmdet's ``DetDataPreprocessor`` with ``pad_size_divisor=32``
    or ``BatchFixedSizePad``, as in apla_mm's configs), and otherwise the map
    still covers the whole image, which is what mmdet's anchor generator
    (``valid_flags`` uses ``ceil(H / stride)``) and RoI extractors
    (coordinates scaled by ``1 / stride``) assume. Inputs that are not a
    multiple of the patch size are rejected by
    :class:`~apla_mm.models.TimmViT` with an explicit error (mmseg's
    ``VisionTransformer`` pads them).

    The design follows the paper and mmdet's ``projects/ViTDet`` (not shipped
    in the mmdet wheel) and detectron2's ``SimpleFeaturePyramid``; this is an
    independent implementation that also accepts other power-of-two scale
    sets, e.g. ``(2.0, 1.0, 0.5, 0.25)`` for a patch-8 ViT.

    Args:
        backbone_channel (int): Channels ``C`` of the backbone map (the ViT's
            embedding dimension).
        out_channels (int): Channels of every output level. Defaults to 256.
        num_outs (int): Number of output levels, at least
            ``len(scale_factors)``. Defaults to 5.
        scale_factors (Sequence[float]): Resampling factor of each level
            relative to the backbone map, finest first; powers of two.
            Defaults to ``(4.0, 2.0, 1.0, 0.5)``.
        in_channels (Sequence[int], optional): Channels of each resampled
            level before the lateral conv, as written in ViTDet configs
            (``[192, 384, 768, 768]`` for ``C = 768``). Derived from
            ``backbone_channel`` and ``scale_factors`` when omitted; checked
            against them when given.
        in_index (int): Which backbone output to use when the backbone
            returns several maps. Defaults to -1 (the last).
        norm_cfg (dict, optional): Norm between two transposed convs and in
            the lateral/output ConvModules. Defaults to
            ``dict(type='LN2d')``.
        act_cfg (dict, optional): Activation of the lateral/output
            ConvModules. Defaults to None (no activation, as in ViTDet).
        upsample_act_cfg (dict): Activation between two transposed convs.
            Defaults to ``dict(type='GELU')``.
        init_cfg (dict | list[dict], optional): Initialisation config.
    """

    def __init__(self,
                 backbone_channel: int,
                 out_channels: int = 256,
                 num_outs: int = 5,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 in_channels: Optional[Sequence[int]] = None,
                 in_index: int = -1,
                 norm_cfg: ConfigType = dict(type='LN2d'),
                 act_cfg: ConfigType = None,
                 upsample_act_cfg: dict = dict(type='GELU'),
                 init_cfg: Union[dict, List[dict], None] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not scale_factors:
            raise ValueError('scale_factors must not be empty.')
        steps = [_log2_scale(float(s)) for s in scale_factors]
        if any(a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(
                'scale_factors must be strictly decreasing (finest level '
                f'first), got {tuple(scale_factors)}.')
        if num_outs < len(scale_factors):
            raise ValueError(
                f'num_outs={num_outs} is smaller than the '
                f'{len(scale_factors)} levels of scale_factors '
                f'{tuple(scale_factors)}.')
        derived = [backbone_channel // 2**max(k, 0) for k in steps]
        if any(backbone_channel % 2**max(k, 0) for k in steps):
            raise ValueError(
                f'backbone_channel={backbone_channel} must be divisible by '
                f'{2**max(steps)}: each 2x up-sampling halves the channels.')
        if in_channels is not None and list(in_channels) != derived:
            raise ValueError(
                f'in_channels={list(in_channels)} does not match what the '
                f'scale factors {tuple(scale_factors)} produce from '
                f'backbone_channel={backbone_channel}: {derived}. Omit '
                'in_channels or fix it.')
        self.backbone_channel = backbone_channel
        self.in_channels = derived
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.in_index = in_index

        self.samplers = nn.ModuleList([
            self._make_sampler(k, backbone_channel, norm_cfg,
                               upsample_act_cfg) for k in steps
        ])
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for channels in self.in_channels:
            self.lateral_convs.append(
                ConvModule(
                    channels,
                    out_channels,
                    1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False))
            self.fpn_convs.append(
                ConvModule(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False))

    @staticmethod
    def _make_sampler(steps: int, channels: int, norm_cfg: ConfigType,
                      act_cfg: dict) -> nn.Module:
        """Resample by ``2**steps``: transposed convs up, max pooling down."""
        if steps == 0:
            return nn.Identity()
        if steps < 0:
            return nn.Sequential(*[
                nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
                for _ in range(-steps)
            ])
        layers: List[nn.Module] = []
        for i in range(steps):
            if i > 0:
                if norm_cfg is not None:
                    layers.append(build_norm_layer(norm_cfg, channels)[1])
                layers.append(build_activation_layer(act_cfg))
            layers.append(
                nn.ConvTranspose2d(
                    channels, channels // 2, kernel_size=2, stride=2))
            channels //= 2
        return nn.Sequential(*layers)

    def _select_input(
            self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]
    ) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            x = inputs
        else:
            inputs = list(inputs)
            if not inputs:
                raise ValueError('SimpleFPN got no backbone output.')
            x = inputs[self.in_index]
        if x.dim() != 4:
            raise ValueError(
                'SimpleFPN expects the backbone map as (N, C, H, W), got '
                f'shape {tuple(x.shape)}; a ViT backbone must return NCHW '
                'maps (TimmViT does; for mmseg VisionTransformer keep '
                'output_cls_token=False).')
        if x.shape[1] != self.backbone_channel:
            raise ValueError(
                f'SimpleFPN got a map with {x.shape[1]} channels but '
                f'backbone_channel={self.backbone_channel}; set '
                "model.neck.backbone_channel to the ViT's embedding "
                'dimension.')
        return x

    def forward(
        self, inputs: Union[torch.Tensor, Sequence[torch.Tensor]]
    ) -> Tuple[torch.Tensor, ...]:
        """Build the pyramid.

        Args:
            inputs (Tensor | Sequence[Tensor]): The backbone output: one
                ``(N, C, H, W)`` map or a sequence of them (``in_index``
                picks one).

        Returns:
            tuple[Tensor]: ``num_outs`` maps with ``out_channels`` channels,
            finest first; level ``i < len(scale_factors)`` has size
            ``ceil(H * s_i) x ceil(W * s_i)``, each extra level half (rounded
            up) of the previous one.
        """
        x = self._select_input(inputs)
        outs = []
        for sampler, lateral, fpn_conv in zip(self.samplers,
                                              self.lateral_convs,
                                              self.fpn_convs):
            outs.append(fpn_conv(lateral(sampler(x))))
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
