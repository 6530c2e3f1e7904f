# APLA, rank 64 of 768 channels: Mask R-CNN + timm ViT-B/16, COCO.
_base_ = ['../finetune/mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py']
custom_imports = dict(imports=['apla_mm'], allow_failed_imports=False)
custom_hooks = [dict(type='APLAHook', rank=64, seed=0)]
# The official APLA recipe: biases and 1-D parameters without weight decay.
optim_wrapper = dict(
    paramwise_cfg=dict(bias_decay_mult=0.0, flat_decay_mult=0.0))
