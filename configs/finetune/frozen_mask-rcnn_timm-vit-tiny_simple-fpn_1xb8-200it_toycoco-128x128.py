# Frozen timm backbone: only the simple FPN, RPN and RoI heads train.
_base_ = ['./mask-rcnn_timm-vit-tiny_simple-fpn_1xb8-200it_toycoco-128x128.py']
model = dict(backbone=dict(frozen=True))
