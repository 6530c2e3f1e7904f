"""META: a memory-efficient adapter around a (frozen) timm ViT.

Our implementation of META (Dong Zhang, Rui Yan, Pingcheng Dong, Kwang-Ting
Cheng, "Memory Efficient Transformer Adapter for Dense Predictions", ICLR
2025, arXiv 2502.01962), written from the paper's abstract, its Fig. 2 and
the OpenReview discussion; there is no official code. The layout is that
of ViT-Adapter (Chen et al., ICLR 2023), with META's cascaded MEA
(:class:`~apla_mm.models.meta_adapter.CascadedMEA`) as injector and
extractor in place of deformable attention::

    image -> SPM -> c1 (1/4), c2 (1/8), c3 (1/16), c4 (1/32)
    F_sp  = sum of c2, c3, c4 resampled to the ViT grid
    F_vit = patch embedding + position embedding (+ prefix tokens)
    for stage i = 1..N:
        F_vit[patches] += gamma_i * InjectorCMEA_i(query=F_vit, kv=F_sp)
        F_vit = ViT blocks of stage i (F_vit)
        F_sp += ExtractorCMEA_i(query=F_sp, kv=F_vit[patches])
    out_l = norm_l(c_l + resample(F_sp + F_vit[patches], level l)), l=1..4

The paper leaves many points open (it gives neither code nor the numbers
below; see ``docs/meta_adapter.md``); our choices, numbered as the open
points in that document:

1. **Interactions**: ``num_interactions=4`` stages of (nearly) equal
   length, i.e. ViT-Adapter's spans (``[[0,2],[3,5],[6,8],[9,11]]`` for 12
   blocks, ``[[0,5],...,[18,23]]`` for 24); ``interaction_indexes`` sets
   them explicitly. One injector before and one extractor after each
   stage.
2. **Cascade**: ``num_cascades=8`` heads by default (MEA width 96 on
   ViT-B; 2 in the toy configs). Channels are split evenly; head ``h``
   reads query chunk ``h`` plus head ``h-1``'s output; all head outputs
   are concatenated and projected (EfficientViT's cascaded group
   attention). Only the query stream cascades. Parameters scale as
   ``D^2 / num_cascades``: with 8 heads the ViT-B adapter has 14.4M
   parameters, below ViT-Adapter-B's ~15.0M (META claims fewer parameters
   than ViT-Adapter); 4 heads (a reviewer's "16 layers" read as 4
   interactions x 4 heads) would give 22.1M.
3. **Widths**: the adapter works at the ViT width ``D`` (as ViT-Adapter);
   each MEA at ``d = D / num_cascades``; ``num_heads=2`` attention heads
   per MEA (one horizontal, one vertical); FFN hidden width
   ``mlp_ratio * d`` with ``mlp_ratio=1``.
4. **Two token sets**: ViT-Adapter's spatial-prior tokens (1/8, 1/16,
   1/32) and the ViT tokens differ in number, but Fig. 2(a) concatenates
   the two streams along channels, which needs one grid. We put both on
   the **ViT grid** (``H/p x W/p``): the SPM levels c2-c4 are bilinearly
   resampled to it and summed once, at the start. This is also the
   cheapest choice (the adapter never holds more tokens than the ViT) and
   makes the cross-shaped stripes of both streams coincide. Queries come
   from the query stream's half of the shared norm, keys/values from the
   key/value stream's half.
5. **Cross-shaped attention**: CSWin's split, half of the heads in
   horizontal, half in vertical stripes of ``stripe_width`` tokens
   (default 8: 4 stripes per direction on the 32x32 grid of a 512 input,
   8 on the 64x64 grid of a 1024 input; 2 for the toy's 8x8 grid);
   narrower last stripe when the grid is not a multiple; no LePE (the
   conv branch gives the local/positional bias).
6. **Kernels**: the conv branch is DWConv-GELU-DWConv-GELU-DWConv as drawn,
   with **3x3** kernels (``conv_kernel_size``): the drawn 1x1 depthwise
   convs would only scale channels and give no local bias. The FFN is two
   linear layers with GELU ("MLP layer" in the figure). "GLUE" is read
   as GELU.
7. **Fusion and norm**: "channel-wise concat & projection" = one linear
   layer on ``[x, y, attn, ffn, conv(x), conv(y)]`` (``6d -> d``),
   computed without building the concatenation. The shared norm is one
   LayerNorm over the bus ``[x, y]`` with statistics per stream and no
   affine (see :class:`~apla_mm.models.meta_adapter.MEABlock`).
8. **Injection scale**: learnable per-channel ``gamma`` per interaction,
   initialised to 0 (ViT-Adapter), so training starts from the pretrained
   ViT's features. The extractor is residual without a scale
   (``F_sp += C-MEA(F_sp, F_vit)``).
9. **Frozen ViT**: ``frozen=True`` by default (the figure's padlocks): the
   ViT's parameters get ``requires_grad=False`` at construction (before
   the optimizer is built), run in eval mode (no dropout/drop-path) and
   get no gradient; gradients still flow *through* the frozen blocks to
   the injectors. ``frozen=False`` trains the ViT too.
10. **SPM**: ViT-Adapter's (stem + three stride-2 convs, ``conv_inplane=64``,
    1x1 projections to ``D``), see
    :class:`~apla_mm.models.meta_adapter.SpatialPriorModule`.
11. **Pyramid**: four maps at strides 4, 8, 16, 32: each SPM level plus the
    final ``F_sp + F_vit`` resampled (bilinear) to it, then a norm
    (``norm_cfg``) and, when ``out_channels`` differs from ``D``, a 1x1
    conv. No extra extractors at the last interaction (ViT-Adapter has
    two; omitted to save memory).

Memory: the adapter never materialises the concatenated bus, keeps maps
channel-last (token order, so no layout copies around the depthwise convs
and horizontal stripes), uses fused scaled-dot-product attention per stripe
computes the key/value stream's norm and conv branch once per C-MEA
instead of once per head, and (``recompute_conv``) recomputes the cheap
depthwise conv branch in backward instead of storing its four intermediate
maps per stream. ``with_cp`` recomputes every injector, stage and
extractor in backward.

Input sizes: height and width must be multiples of the patch size; output
``l`` (stride ``s`` = 4, 8, 16, 32) has size ``ceil(H/s) x ceil(W/s)``,
also when ``H`` or ``W`` is not a multiple of 32.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch.utils.checkpoint import checkpoint

from apla_mm.models.backbones.timm_vit import TimmViT
from apla_mm.registry import MODELS

from .mea import CascadedMEA
from .spatial_prior import SpatialPriorModule

__all__ = ['METAAdapterViT', 'even_interaction_indexes']

OUT_STRIDES = (4, 8, 16, 32)


def even_interaction_indexes(depth: int,
                             num_interactions: int) -> List[List[int]]:
    """Split ``depth`` blocks into contiguous ``[first, last]`` spans of
    (nearly) equal length, longer spans first (ViT-Adapter's spans for
    12 and 24 blocks with 4 interactions)."""
    if not 1 <= num_interactions <= depth:
        raise ValueError(f'num_interactions={num_interactions} must be in '
                         f'[1, {depth}] for a ViT with {depth} blocks.')
    base, extra = divmod(depth, num_interactions)
    spans, start = [], 0
    for i in range(num_interactions):
        length = base + (1 if i < extra else 0)
        spans.append([start, start + length - 1])
        start += length
    return spans


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resampling of an NCHW map; identity at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(
        x, size=tuple(size), mode='bilinear', align_corners=False)


@MODELS.register_module()
class METAAdapterViT(TimmViT):
    """timm ViT + META adapter: a 4-level pyramid for UperNet / FPN.

    The design and every choice for what the paper leaves open are in the
    module docstring (:mod:`apla_mm.models.meta_adapter.backbone`) and in
    ``docs/meta_adapter.md``. The ViT is built, loaded and frozen as in
    :class:`TimmViT` (its parameters keep timm's names under ``vit.``);
    the adapter lives in ``spm``, ``injectors``, ``gamma``, ``extractors``,
    ``out_norms`` and ``out_projs``.

    Args:
        model_name (str): A timm ViT name. Defaults to
            ``'vit_base_patch16_224'``.
        model_kwargs (dict, optional): Extra ``timm.create_model``
            arguments (``img_size``, ``embed_dim``, ``depth``, ...).
        num_interactions (int): Stages, each with an injector and an
            extractor, of (nearly) equal length. Defaults to 4.
        interaction_indexes (Sequence[Sequence[int]], optional): Explicit
            ``[first, last]`` block spans (inclusive), contiguous, covering
            all blocks; overrides ``num_interactions``.
        num_cascades (int): Heads of each cascaded MEA; must divide the ViT
            width. Defaults to 8 (MEA width 96 on ViT-B).
        num_heads (int): Cross-shaped attention heads per MEA (even).
            Defaults to 2.
        stripe_width (int): Cross-shaped attention stripe width in ViT
            tokens. Defaults to 8.
        mlp_ratio (float): MEA FFN width relative to the MEA width.
            Defaults to 1.
        conv_kernel_size (int): Depthwise kernel of the MEA conv branch.
            Defaults to 3.
        conv_inplane (int): SPM stem width. Defaults to 64.
        recompute_conv (bool): Recompute the MEA conv branches' intermediate
            maps in backward instead of storing them. Defaults to True.
        add_vit_feature (bool): Add the final ViT tokens to every output
            level. Defaults to True.
        out_channels (int | Sequence[int], optional): Channels of the four
            outputs; the ViT width when None (a 1x1 conv per level
            otherwise).
        norm_cfg (dict, optional): Norm of the SPM and of the outputs.
            Defaults to ``dict(type='BN', requires_grad=True)``; use
            ``SyncBN`` for multi-GPU training.
        init_values (float): Initial injection scale ``gamma``.
            Defaults to 0.
        frozen (bool): Freeze the ViT (the adapter always trains).
            Defaults to True.
        with_cp (bool): Gradient checkpointing of injectors, ViT stages and
            extractors. Defaults to False.
        init_cfg (dict, optional): ``dict(type='Pretrained',
            checkpoint='local/file')`` loads the **ViT** from a local file,
            as in :class:`TimmViT`; the adapter is initialised at
            construction.
    """

    def __init__(self,
                 model_name: str = 'vit_base_patch16_224',
                 model_kwargs: Optional[dict] = None,
                 num_interactions: int = 4,
                 interaction_indexes: Optional[Sequence[Sequence[int]]] = None,
                 num_cascades: int = 8,
                 num_heads: int = 2,
                 stripe_width: int = 8,
                 mlp_ratio: float = 1.0,
                 conv_kernel_size: int = 3,
                 conv_inplane: int = 64,
                 recompute_conv: bool = True,
                 add_vit_feature: bool = True,
                 out_channels: Optional[Union[int, Sequence[int]]] = None,
                 norm_cfg: Optional[dict] = None,
                 init_values: float = 0.0,
                 frozen: bool = True,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        # The parent builds the timm ViT (all blocks kept, head and final
        # norm pruned) and freezes it; adapter modules created below keep
        # requires_grad=True.
        super().__init__(
            model_name=model_name,
            out_indices=(-1, ),
            output_norm=False,
            frozen=frozen,
            with_cp=False,
            model_kwargs=model_kwargs,
            init_cfg=init_cfg)
        vit = self.vit
        if not isinstance(vit.patch_drop, nn.Identity):
            raise ValueError('METAAdapterViT keeps every patch token on the '
                             'grid; set patch_drop_rate=0 in model_kwargs.')
        depth = len(vit.blocks)
        if interaction_indexes is None:
            interaction_indexes = even_interaction_indexes(
                depth, num_interactions)
        spans = [list(map(int, s)) for s in interaction_indexes]
        expected = 0
        for first, last in spans:
            if first != expected or last < first:
                raise ValueError(
                    f'interaction_indexes {spans} must be contiguous '
                    f'[first, last] spans starting at block 0.')
            expected = last + 1
        if expected != depth:
            raise ValueError(f'interaction_indexes {spans} must cover all '
                             f'{depth} blocks.')
        self.interaction_indexes: List[List[int]] = spans
        self.with_cp = with_cp
        self.add_vit_feature = add_vit_feature

        dim = self.embed_dim
        norm_cfg = norm_cfg or dict(type='BN', requires_grad=True)
        if out_channels is None:
            out_channels = dim
        if isinstance(out_channels, int):
            out_channels = [out_channels] * len(OUT_STRIDES)
        if len(out_channels) != len(OUT_STRIDES):
            raise ValueError('out_channels needs one value per output '
                             f'level (4), got {out_channels}.')
        self.out_channels: Tuple[int, ...] = tuple(out_channels)

        cmea = dict(
            num_cascades=num_cascades,
            num_heads=num_heads,
            stripe_width=stripe_width,
            mlp_ratio=mlp_ratio,
            conv_kernel_size=conv_kernel_size,
            recompute_conv=recompute_conv)
        self.spm = SpatialPriorModule(
            dim,
            inplanes=conv_inplane,
            norm_cfg=norm_cfg,
            in_channels=vit.patch_embed.proj.in_channels)
        self.injectors = nn.ModuleList(CascadedMEA(dim, **cmea) for _ in spans)
        self.gamma = nn.Parameter(
            torch.full((len(spans), dim), float(init_values)))
        self.extractors = nn.ModuleList(
            CascadedMEA(dim, **cmea) for _ in spans)
        self.out_norms = nn.ModuleList(
            build_norm_layer(norm_cfg, dim)[1] for _ in OUT_STRIDES)
        self.out_projs = nn.ModuleList(
            nn.Identity() if c == dim else nn.Conv2d(dim, c, 1)
            for c in self.out_channels)
        self._init_adapter_weights()

    def adapter_modules(self) -> List[nn.Module]:
        """Everything that is not the ViT (``gamma`` is a direct
        parameter and not listed)."""
        return [
            self.spm, self.injectors, self.extractors, self.out_norms,
            self.out_projs
        ]

    def _init_adapter_weights(self) -> None:
        """ViT-Adapter's scheme: truncated-normal (std 0.02) linear layers,
        He-normal (fan-out) convolutions, unit/zero norms; ``gamma`` keeps
        ``init_values``."""
        for root in self.adapter_modules():
            for m in root.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Conv2d):
                    fan_out = (
                        m.kernel_size[0] * m.kernel_size[1] * m.out_channels //
                        m.groups)
                    nn.init.normal_(m.weight, 0.0, (2.0 / fan_out)**0.5)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.modules.batchnorm._NormBase,
                                    nn.GroupNorm, nn.LayerNorm)):
                    if getattr(m, 'weight', None) is not None:
                        nn.init.ones_(m.weight)
                    if getattr(m, 'bias', None) is not None:
                        nn.init.zeros_(m.bias)

    def _maybe_cp(self, fn, *args):
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _inject(self, index: int, tokens: torch.Tensor, sp: torch.Tensor,
                grid: Tuple[int, int]) -> torch.Tensor:
        npt = self.vit.num_prefix_tokens
        patches = tokens[:, npt:]
        delta = self.injectors[index](patches.unflatten(1, grid), sp)
        patches = patches + delta.flatten(1, 2) * self.gamma[index]
        if npt:
            return torch.cat([tokens[:, :npt], patches], dim=1)
        return patches

    def _stage(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        first, last = self.interaction_indexes[index]
        for blk in self.vit.blocks[first:last + 1]:
            tokens = blk(tokens)
        return tokens

    def _extract(self, index: int, sp: torch.Tensor, tokens: torch.Tensor,
                 grid: Tuple[int, int]) -> torch.Tensor:
        patches = tokens[:, self.vit.num_prefix_tokens:].unflatten(1, grid)
        return sp + self.extractors[index](sp, patches)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Return four NCHW maps at strides 4, 8, 16, 32
        (``ceil(H/s) x ceil(W/s)``, ``out_channels`` channels)."""
        grid = self.patch_grid(x)
        levels = self.spm(x)
        sp = sum(_resize(c, grid) for c in levels[1:])
        sp = sp.permute(0, 2, 3, 1).contiguous()  # (B, gh, gw, D)

        vit = self.vit
        tokens = vit.norm_pre(
            vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        for i in range(len(self.interaction_indexes)):
            tokens = self._maybe_cp(self._inject, i, tokens, sp, grid)
            tokens = self._maybe_cp(self._stage, i, tokens)
            sp = self._maybe_cp(self._extract, i, sp, tokens, grid)

        fused = sp
        if self.add_vit_feature:
            fused = fused + tokens[:, vit.num_prefix_tokens:].unflatten(
                1, grid)
        fused = fused.permute(0, 3, 1, 2)  # NCHW view, channels_last layout
        outs = []
        for c, norm, proj in zip(levels, self.out_norms, self.out_projs):
            outs.append(proj(norm(c + _resize(fused, c.shape[-2:]))))
        return tuple(outs)
