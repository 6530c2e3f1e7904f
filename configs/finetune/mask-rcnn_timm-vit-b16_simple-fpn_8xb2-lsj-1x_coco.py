# Full fine-tuning: Mask R-CNN + timm ViT-B/16 + simple FPN on COCO, LSJ
# 1024x1024, AdamW 1x, 16 images per iteration (8 GPUs x 2).
# Expects data/coco (mmdet layout) and the ViT weights as a local file (see
# configs/_base_/models/mask-rcnn_timm-vit-b16_simple-fpn.py).
_base_ = [
    '../_base_/models/mask-rcnn_timm-vit-b16_simple-fpn.py',
    '../_base_/datasets/coco_instance_lsj-1024.py',
    '../_base_/schedules/det_adamw-1x.py', 'mmdet::_base_/default_runtime.py'
]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))
