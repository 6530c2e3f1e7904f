# Frozen timm ViT-B/16: only the simple FPN, RPN and RoI heads train.
_base_ = ['./mask-rcnn_timm-vit-b16_simple-fpn_8xb2-lsj-1x_coco.py']
model = dict(backbone=dict(frozen=True))
