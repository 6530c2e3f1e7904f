"""A timm ViT with a linear classification head (the APLA paper's setting).

The ``backbone`` preset of the benchmark trains this model: a timm
``VisionTransformer`` without its head (``num_classes=0``, so it returns the
pooled token: the cls token for the standard ViTs) and a new
``nn.Linear(embed_dim, num_classes)`` head, with a cross-entropy loss. The
submodules are called ``backbone`` and ``head`` so that the PEFT adapters
(whose ``frozen_modules`` default to ``('backbone',)``) and their target
patterns (``blocks.N.attn.proj``/``qkv``) apply unchanged.
"""
from typing import Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModel

from apla_mm.registry import MODELS


@MODELS.register_module()
class BenchViTClassifier(BaseModel):
    """timm ViT + linear head on the pooled token.

    Args:
        model_name (str): timm ViT name. Defaults to
            ``'vit_base_patch16_224'``.
        num_classes (int): Classes of the linear head. Defaults to 1000.
        model_kwargs (dict, optional): Extra ``timm.create_model`` arguments
            (``img_size``, ``embed_dim``, ``depth``, ...).
        frozen (bool): Freeze the ViT (linear probing): no gradients, eval
            mode (no dropout/drop-path), as ``TimmViT(frozen=True)``.
            Defaults to False.
        with_cp (bool): timm's gradient checkpointing of the blocks.
            Defaults to False.
    """

    def __init__(self,
                 model_name: str = 'vit_base_patch16_224',
                 num_classes: int = 1000,
                 model_kwargs: Optional[dict] = None,
                 frozen: bool = False,
                 with_cp: bool = False,
                 data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        import timm
        self.backbone = timm.create_model(
            model_name, pretrained=False, num_classes=0,
            **(model_kwargs or {}))
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.num_classes = num_classes
        self.frozen = frozen
        if with_cp:
            self.backbone.set_grad_checkpointing(True)
        if frozen:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> 'BenchViTClassifier':
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[torch.Tensor] = None,
                mode: str = 'tensor') -> Union[Dict[str, torch.Tensor],
                                               torch.Tensor]:
        """``mode='loss'``: ``data_samples`` are the class labels (``B``);
        ``'tensor'``/``'predict'``: the logits."""
        logits = self.head(self.backbone(inputs))
        if mode == 'loss':
            return dict(loss_cls=F.cross_entropy(logits, data_samples))
        return logits
