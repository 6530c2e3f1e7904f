# APLA, rank 8 of 96 channels: Mask R-CNN + tiny timm ViT, toy COCO.
_base_ = [
    '../finetune/mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco-128x128.py'
]
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=8, seed=0)]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
